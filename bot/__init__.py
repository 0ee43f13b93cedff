"""Banryeo (반려지능): a companion chatbot that learns from the replies its user picks.

The package is split by concern:

    config.py    typed settings (TOML file + environment)
    model.py     the model backend: loading, the embedded Gemma cache, batched sampling
    tokenizer.py a model's tokenizer alone: token counts, chat templates, control tokens
    serving/     generators: many users' adapters in one local batch, or on a vLLM server
    prompt.py    turning a persona and a history into a prompt, and raw samples into replies
    store.py     SQLite: users, conversations, turns, offers (candidate sets), picks, reactions, generations
    generations.py  lineages and their generations: names, numbers, promote, rollback, prune, forget
    engine.py    the platform-free dialogue engine every chat platform plugs into
    commands.py  the chat commands, once for every platform
    messages.py  the bot's own words, in Korean and English
    console.py · discord_bot.py · telegram_bot.py   the chat adapters
    admin.py     what admins can do (status, train now, rollback, stats), for the commands and the CLI
    picks_import.py  picks made elsewhere, stored as live picks
    cli.py       the `banryeo` command
"""

__version__ = "0.1.0"
