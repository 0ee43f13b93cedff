"""Persona cards for Banryeo: the TOML card format, SillyTavern import, and the card library."""

from persona.cards import (
    PersonaCard,
    PersonaError,
    PersonaLibrary,
    builtin_cards_dir,
    check_card,
    dump_card,
    import_card,
    load_card,
)

__all__ = ["PersonaCard", "PersonaError", "PersonaLibrary", "builtin_cards_dir", "check_card", "dump_card",
           "import_card", "load_card"]
