"""Banryeo (반려지능): a companion chatbot that learns from the replies its user picks.

The package is split by concern:

    config.py    typed settings (TOML file + environment)
    model.py     the model backend: loading, the embedded Gemma cache, batched sampling
    tokenizer.py a model's tokenizer alone: token counts, chat templates, control tokens
    serving/     generators: many users' adapters in one local batch, or on a vLLM server
    prompt.py    turning a persona and a history into a prompt, and raw samples into replies
    store.py     SQLite: users, conversations, turns, candidate sets, picks, reactions, generations
    engine.py    the platform-free dialogue engine every chat platform plugs into
    messages.py  the bot's own words, in Korean and English
    console.py   the terminal chat adapter
    cli.py       the `banryeo` command
"""

__version__ = "0.1.0"
