"""Discord: chat in DMs, pick replies with reactions (or buttons), slash commands.

Intents: the defaults, which include DM messages and DM reactions. The privileged message-content
intent is not needed: Discord sends the content of DMs (and of messages that mention the bot).

    bot = create_discord_bot(engine, admin, settings)
    await bot.start(token)

A DM gets a typing indicator while candidates are sampled, then one message with the numbered
candidates and reactions 1️⃣…N plus 🔄 (regenerate), or buttons 1…N plus 🔄 (`discord.pick_with`). A
pick edits the message down to the chosen reply. A new message without a pick skips the offer: its
candidates stay visible but can no longer be picked (the engine answers such late picks with a clear notice).

Discord fails an interaction that is not answered within 3 seconds, so every command that may wait
(for the user's lock while a reply is sampled, for the database, for a chart) defers first and
answers with a followup. Admin commands are offered only in servers, to members with Administrator
(or only in `discord.admin_guild_id`), and are checked against `admins` whoever calls them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re

import discord
import yarl
from discord import app_commands

from bot.admin import Admin
from bot.config import Settings
from bot.engine import Offer, DialogueEngine, EngineError, UserRef
from bot.commands import DESCRIPTIONS, PUBLIC_COMMANDS, Commands
from bot.messages import NUMBERS, numbered_offer, render
from bot.messages import fit as fit_within

logger = logging.getLogger(__name__)

PICK_EMOJIS = NUMBERS
REGENERATE = "🔄"
THUMBS = {"👍": 1, "👎": -1}
MESSAGE_LIMIT = 2000
PLATFORM = "discord"


def user_ref(author: discord.abc.User, guild_channel_id: int | None = None, locale: str = "") -> UserRef:
    """The engine's user; in a server channel, with the channel's id so it gets its own conversation."""
    return UserRef(PLATFORM, str(author.id), getattr(author, "global_name", None) or author.name,
                   str(guild_channel_id) if guild_channel_id else "", locale)


def interaction_user(interaction: discord.Interaction) -> UserRef:
    """Interactions carry the user's app language (messages and reactions do not; the engine remembers it)."""
    return user_ref(interaction.user, interaction.channel_id if interaction.guild_id else None,
                    interaction.locale.value)


def to_presser(interaction: discord.Interaction):
    """Where a refusal to a button press goes: to whoever pressed only (another member, in a server)."""
    async def tell(text: str) -> None:
        await interaction.followup.send(text, ephemeral=True)
    return tell


@contextlib.asynccontextmanager
async def typing_in(channel: discord.abc.Messageable):
    """"Typing…" while the block runs; a channel that refuses it (403, a Discord hiccup) loses nothing."""
    indicator = channel.typing()
    try:
        await indicator.__aenter__()
    except discord.HTTPException as exc:
        logger.warning("typing indicator failed (%s); answering anyway", exc.status)
        indicator = None
    try:
        yield
    finally:
        if indicator is not None:
            await indicator.__aexit__(None, None, None)


def fit(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return fit_within(text, limit)


def offer_text(offer: Offer, language: str, notices: list[str]) -> str:
    """Numbered candidates in one message within Discord's 2,000 characters."""
    return numbered_offer(offer.texts, notices, language, MESSAGE_LIMIT)


class PickButton(discord.ui.DynamicItem[discord.ui.Button], template=r"banryeo:pick:(?P<set_id>[0-9a-f]+):(?P<index>\d+)"):
    """A button that picks candidate `index` of set `set_id`; its custom_id survives restarts."""

    def __init__(self, set_id: str, index: int):
        super().__init__(discord.ui.Button(label=str(index + 1), style=discord.ButtonStyle.primary,
                                           custom_id=f"banryeo:pick:{set_id}:{index}"))
        self.set_id = set_id
        self.index = index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match):
        return cls(match["set_id"], int(match["index"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: CompanionBot = interaction.client  # type: ignore[assignment]
        await interaction.response.defer()
        await bot.pick(interaction_user(interaction), self.set_id, self.index, interaction.channel_id,
                       interaction.message.id if interaction.message else None, tell=to_presser(interaction))


class RegenerateButton(discord.ui.DynamicItem[discord.ui.Button], template=r"banryeo:regen:(?P<set_id>[0-9a-f]+)"):
    """🔄 as a button: new candidates for the offer `set_id` (buttons mode has no reactions to tap)."""

    def __init__(self, set_id: str):
        super().__init__(discord.ui.Button(emoji=REGENERATE, style=discord.ButtonStyle.secondary,
                                           custom_id=f"banryeo:regen:{set_id}"))
        self.set_id = set_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match):
        return cls(match["set_id"])

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: CompanionBot = interaction.client  # type: ignore[assignment]
        await interaction.response.defer()
        if await bot.regenerate(interaction_user(interaction), interaction.channel_id, self.set_id,
                                tell=to_presser(interaction)):
            await interaction.edit_original_response(view=None)  # the replaced candidates can't be picked


def offer_view(offer: Offer) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for index in range(len(offer.texts)):
        view.add_item(PickButton(offer.id, index))
    view.add_item(RegenerateButton(offer.id))
    return view


class ConfirmForget(discord.ui.View):
    """Two buttons; only the user who asked can answer. `confirmed` is None until one is pressed."""

    def __init__(self, owner_id: int, language: str):
        super().__init__(timeout=120)
        self.owner_id = owner_id
        self.language = language
        self.confirmed: bool | None = None

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.owner_id:
            return True
        await interaction.response.send_message(render("not_yours", self.language), ephemeral=True)
        return False

    @discord.ui.button(label="Delete / 삭제", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.confirmed = True
        bot: CompanionBot = interaction.client  # type: ignore[assignment]
        await interaction.response.defer()  # the forget waits for a reply being sampled: answer Discord first
        done = await bot.commands.forget_confirmed(user_ref(interaction.user))
        await interaction.edit_original_response(content=done.text, view=None)
        self.stop()

    @discord.ui.button(label="Cancel / 취소", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.confirmed = False
        await interaction.response.edit_message(content=render("forget_cancelled", self.language), view=None)
        self.stop()


class CompanionBot(discord.Client):
    user: discord.ClientUser

    def __init__(self, engine: DialogueEngine, admin: Admin, settings: Settings, **options):
        # model output may contain "@everyone" or "<@id>": the bot's messages never ping anyone
        super().__init__(intents=discord.Intents.default(), allowed_mentions=discord.AllowedMentions.none(),
                         **options)
        self.engine = engine
        self.commands = Commands(engine, admin)
        self.settings = settings
        self.tree = app_commands.CommandTree(self)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(PickButton, RegenerateButton)
        admin_guild = discord.Object(self.settings.discord.admin_guild_id) if self.settings.discord.admin_guild_id \
            else None
        add_commands(self.tree, admin_guild)
        await self.tree.sync()
        if admin_guild is not None:
            await self.tree.sync(guild=admin_guild)

    # -- chat ---------------------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot:
            return  # ourselves (Discord echoes our messages) and other bots
        in_server = not isinstance(message.channel, discord.DMChannel)
        if in_server and not (self.settings.discord.answer_in_guilds and self.user in message.mentions):
            return
        user = user_ref(message.author, message.channel.id if in_server else None)
        language = self.engine.language_of(user)
        text = message.content.replace(f"<@{self.user.id}>", "").strip()
        if not text and (message.attachments or message.stickers or message.embeds):
            await message.channel.send(render("text_only", language))
            return
        try:
            async with typing_in(message.channel):
                offer = await self.engine.on_message(user, text)
        except EngineError as exc:
            await message.channel.send(render(exc.key, language, **exc.params))
            return
        await self.send_offer(message.channel, user, offer)

    async def send_offer(self, channel: discord.abc.Messageable, user: UserRef, offer: Offer) -> None:
        language = offer.language
        if offer.opening:
            await channel.send(fit(f"{offer.persona_name}: {offer.opening}"))
        notices = [render(n.key, language, **n.params) for n in offer.notices]
        if offer.auto_picked:  # one distinct reply: nothing to choose, but it can still get 👍/👎
            sent = await channel.send(fit("\n".join([*notices, f"{offer.persona_name}: {offer.texts[0]}"])))
            self.engine.link_message(PLATFORM, str(sent.id), offer.id)
            return
        mode = self.settings.discord.pick_with
        view = offer_view(offer) if mode in ("buttons", "both") else None
        sent = await channel.send(offer_text(offer, language, notices), view=view)
        self.engine.link_message(PLATFORM, str(sent.id), offer.id)
        if mode in ("reactions", "both"):
            for emoji in [*PICK_EMOJIS[: len(offer.texts)], *([] if view else [REGENERATE])]:
                await sent.add_reaction(emoji)

    async def on_error(self, event_method: str, /, *args, **kwargs) -> None:
        # A user who blocked the bot (403), or Discord failing for a moment: the engine has already stored
        # the message and its candidates, so nothing is lost; log it and keep serving everyone else.
        logger.exception("Discord event %s failed", event_method)

    def reactor(self, payload: discord.RawReactionActionEvent) -> UserRef | None:
        """Who reacted, as the engine knows them; None for our own reactions (they come back as events
        too) and for server channels the bot does not answer in."""
        if payload.user_id == self.user.id:
            return None
        if payload.guild_id is None:
            return UserRef(PLATFORM, str(payload.user_id))
        if not self.settings.discord.answer_in_guilds:
            return None
        return UserRef(PLATFORM, str(payload.user_id), chat=str(payload.channel_id))

    async def tell_privately(self, user: UserRef, text: str) -> None:
        """A refusal for a reaction in a server channel goes to the reactor's DMs, not to everyone there."""
        channel = await self.create_dm(discord.Object(int(user.platform_id)))
        await channel.send(text)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        user = self.reactor(payload)
        if user is None:
            return
        set_id = self.engine.offer_shown_in(PLATFORM, str(payload.message_id))
        emoji = str(payload.emoji)
        if set_id is None or (emoji not in PICK_EMOJIS and emoji != REGENERATE and emoji not in THUMBS):
            return  # not a candidate message, or an unrelated emoji
        tell = (lambda text: self.tell_privately(user, text)) if user.chat else None
        if emoji in THUMBS:
            await self.engine.on_thumb(user, set_id, THUMBS[emoji])  # the reaction itself is the confirmation
        elif emoji == REGENERATE:
            await self.regenerate(user, payload.channel_id, set_id, tell=tell)
        else:
            await self.pick(user, set_id, PICK_EMOJIS.index(emoji), payload.channel_id, payload.message_id, tell=tell)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        user = self.reactor(payload)
        if user is None or str(payload.emoji) not in THUMBS:
            return
        set_id = self.engine.offer_shown_in(PLATFORM, str(payload.message_id))
        if set_id is not None:
            await self.engine.on_thumb(user, set_id, 0)

    async def pick(self, user: UserRef, set_id: str, index: int, channel_id: int, message_id: int | None,
                   tell=None) -> None:
        """Record a pick and show it; a refusal goes to `tell` (the presser or reactor only) or the channel."""
        channel = self.get_partial_messageable(channel_id)
        language = self.engine.language_of(user)
        try:
            picked = await self.engine.on_pick(user, set_id, index)
        except EngineError as exc:
            await (tell or channel.send)(render(exc.key, language, **exc.params))
            return
        if picked.already or message_id is None:
            return
        text = fit(f"{picked.persona_name}: {picked.text}\n-# {render('picked', language, number=index + 1)} · 👍 👎")
        message = channel.get_partial_message(message_id)
        await message.edit(content=text, view=None)
        for emoji in THUMBS:  # the rating the footer offers is one tap away
            await message.add_reaction(emoji)

    async def regenerate(self, user: UserRef, channel_id: int, set_id: str, tell=None) -> bool:
        """New candidates for offer `set_id`; a refusal goes to `tell` or the channel. True when offered."""
        channel = self.get_partial_messageable(channel_id)
        try:
            async with typing_in(channel):
                offer = await self.engine.regenerate(user, set_id)
        except EngineError as exc:
            await (tell or channel.send)(render(exc.key, self.engine.language_of(user), **exc.params))
            return False
        await self.send_offer(channel, user, offer)
        return True


def describe(name: str) -> str:
    english, korean = DESCRIPTIONS[name]
    return f"{english} / {korean}"


async def run_command(interaction: discord.Interaction, name: str, *args: str | int | None) -> None:
    """Run a command of bot/commands.py and show its reply.

    Discord fails an interaction not answered within 3 seconds, and a command may wait (for a reply being
    sampled for this user, the database, a chart), so every command is acknowledged ("thinking…") first.
    """
    bot: CompanionBot = interaction.client  # type: ignore[assignment]
    public = name in PUBLIC_COMMANDS
    await interaction.response.defer(ephemeral=not public, thinking=True)
    user = interaction_user(interaction)
    reply = await bot.commands.run(name, user, [str(a) for a in args if a is not None])
    while reply is not None:
        if reply.refused and public:  # a refusal only the caller sees, in place of the public "thinking…"
            await interaction.delete_original_response()
        extras: dict = {}
        if reply.file is not None:
            extras["file"] = discord.File(io.BytesIO(reply.file[1]), filename=reply.file[0])
        if reply.image is not None:
            extras["file"] = discord.File(reply.image)
        if reply.confirm_forget:
            extras["view"] = ConfirmForget(interaction.user.id, bot.engine.language_of(user))
        await interaction.followup.send(fit(reply.text), ephemeral=reply.private, **extras)
        reply = await reply.later() if reply.later is not None else None


def add_commands(tree: app_commands.CommandTree, admin_guild: discord.abc.Snowflake | None = None) -> None:
    """Every command of bot/commands.py as a slash command; admin ones only in servers, for members with
    Administrator (or only in `admin_guild`). Who may run them is decided in bot/commands.py."""

    def admin_command(name: str):
        def register(callback):
            command = app_commands.guild_only(app_commands.default_permissions(administrator=True)(callback))
            return tree.command(name=name, description=describe(name), guild=admin_guild)(command)
        return register

    def without_options(name: str):
        async def command(interaction: discord.Interaction) -> None:
            await run_command(interaction, name)
        return command

    for name in ("start", "help", "reset", "export", "forget"):
        tree.command(name=name, description=describe(name))(without_options(name))
    for name in ("status", "train", "pause", "resume"):
        admin_command(name)(without_options(name))

    @tree.command(name="persona", description=describe("persona"))
    @app_commands.describe(name="persona key, e.g. haru or sam")
    async def persona_command(interaction: discord.Interaction, name: str | None = None) -> None:
        await run_command(interaction, "persona", name)

    @tree.command(name="learning", description=describe("learning"))
    @app_commands.describe(choice="on or off")
    @app_commands.choices(choice=[app_commands.Choice(name="on", value="on"),
                                  app_commands.Choice(name="off", value="off")])
    async def learning_command(interaction: discord.Interaction, choice: str | None = None) -> None:
        await run_command(interaction, "learning", choice)

    @admin_command("rollback")
    @app_commands.describe(lineage="a user id such as discord:1234, or shared", number="generation number")
    async def rollback_command(interaction: discord.Interaction, lineage: str, number: int | None = None) -> None:
        await run_command(interaction, "rollback", lineage, number)

    @admin_command("stats")
    @app_commands.describe(lineage="a user id such as discord:1234, or shared")
    async def stats_command(interaction: discord.Interaction, lineage: str | None = None) -> None:
        await run_command(interaction, "stats", lineage)


def create_discord_bot(engine: DialogueEngine, admin: Admin, settings: Settings, **options) -> CompanionBot:
    """An unstarted bot; `discord.api_base`/`gateway_url` point it at a local test server."""
    if settings.discord.api_base:
        discord.http.Route.BASE = settings.discord.api_base
    if settings.discord.gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord.gateway_url)
    return CompanionBot(engine, admin, settings, **options)
