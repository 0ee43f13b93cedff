"""A local fake of Discord (REST v10 + gateway websocket) on 127.0.0.1 for end-to-end tests.

The real discord.py client logs in over REST, opens the gateway, receives READY, and then gets
whatever the test dispatches (DM messages, reactions, interactions). Every REST call the bot makes is
recorded in `calls`; `wait_for` waits for one. Like real Discord, the bot's own messages and reactions
are echoed back as gateway events, so a bot that forgets to ignore itself fails the tests; an
interaction must be answered (or deferred) once, within `interaction_deadline` seconds, or its
callback fails with "Unknown interaction"; a command can only be invoked where it is offered (its
`contexts`, and guild commands only in their guild).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import datetime, timezone

from aiohttp import WSMsgType, web

BOT_USER = {"id": "1000", "username": "banryeo", "discriminator": "0", "global_name": "Banryeo", "avatar": None,
            "bot": True}
APP_ID = "1000"


def user(user_id: int, name: str) -> dict:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name.title(), "avatar": None}


class FakeDiscord:
    def __init__(self, token: str = "test-token"):
        self.token = token
        self.calls: list[tuple[str, str, object]] = []
        self.changed = asyncio.Condition()
        self.messages: dict[str, dict] = {}
        self.commands: list[dict] = []
        self.guild_commands: dict[str, list[dict]] = {}   # guild id -> commands synced to that guild only
        self.interaction_deadline = 3.0              # seconds Discord waits for the first answer
        self.interactions: dict[str, float] = {}    # id -> when it was sent (removed once answered)
        self.late_callbacks: list[str] = []          # interactions answered too late, or twice
        self.typing_status: dict[str, int] = {}      # channel -> error status for its typing calls
        self.guild_channels = {"600": "900"}         # server channels tests use -> their guild
        self.identify: dict | None = None
        self.resumes: list[dict] = []               # RESUME payloads (op 6) after a dropped connection
        self.connections = 0
        self.ws: web.WebSocketResponse | None = None
        self.ready = asyncio.Event()
        self._ids = itertools.count(2_000_000_000_000_000)
        self._seq = itertools.count(1)
        self.rate_limit_next: dict[str, int] = {}  # path fragment -> how many 429s to answer first
        self.blocked_channels: set[str] = set()     # DMs with users who blocked the bot: 403 on send
        self.runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/", self._gateway)
        api = "/api/v10"
        app.router.add_get(api + "/users/@me", lambda r: self._json(BOT_USER))
        app.router.add_get(api + "/oauth2/applications/@me", self._app_info)
        app.router.add_get(api + "/gateway/bot", self._gateway_bot)
        app.router.add_put(api + "/applications/{app}/commands", self._sync_commands)
        app.router.add_put(api + "/applications/{app}/guilds/{guild}/commands", self._sync_guild_commands)
        app.router.add_post(api + "/channels/{channel}/messages", self._send_message)
        app.router.add_patch(api + "/channels/{channel}/messages/{message}", self._edit_message)
        app.router.add_put(api + "/channels/{channel}/messages/{message}/reactions/{emoji}/@me", self._react)
        app.router.add_delete(api + "/channels/{channel}/messages/{message}/reactions", self._no_content)
        app.router.add_post(api + "/channels/{channel}/typing", self._typing)
        app.router.add_post(api + "/users/@me/channels", self._create_dm)
        app.router.add_post(api + "/interactions/{id}/{token}/callback", self._interaction_callback)
        app.router.add_post(api + "/webhooks/{app}/{token}", self._followup)
        app.router.add_patch(api + "/webhooks/{app}/{token}/messages/@original", self._followup)
        app.router.add_delete(api + "/webhooks/{app}/{token}/messages/@original", self._no_content)
        self.runner = web.AppRunner(app, access_log=None)  # its request lines are the server's logs, not the bot's
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    # -- what tests drive -------------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict) -> None:
        await self.ready.wait()
        await self.ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def dm(self, author: dict, content: str, channel: str = "500", **extra) -> dict:
        message = {"id": str(next(self._ids)), "channel_id": channel, "type": 0, "content": content,
                   "author": author, "timestamp": _now(), "edited_timestamp": None, "tts": False,
                   "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
                   "embeds": [], "pinned": False, "flags": 0, "components": [], **extra}
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def react(self, user_id: str, message_id: str, emoji: str, channel: str = "500",
                    guild: str | None = None) -> None:
        event = {"user_id": user_id, "channel_id": channel, "message_id": message_id,
                 "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0}
        if guild is not None:
            event["guild_id"] = guild
        await self.dispatch("MESSAGE_REACTION_ADD", event)

    async def unreact(self, user_id: str, message_id: str, emoji: str, channel: str = "500") -> None:
        await self.dispatch("MESSAGE_REACTION_REMOVE", {"user_id": user_id, "channel_id": channel,
                                                        "message_id": message_id, "emoji": {"id": None, "name": emoji},
                                                        "burst": False, "type": 0})

    async def drop_connection(self, code: int = 4000) -> None:
        """Close the gateway like a Discord hiccup does; the client should reconnect and RESUME."""
        self.ready.clear()
        await self.ws.close(code=code, message=b"unknown error")

    async def interaction(self, author: dict, data: dict, kind: int = 2, message: dict | None = None,
                          channel: str = "500", guild: str | None = None, locale: str = "ko",
                          permissions: str = "0") -> str:
        """An interaction in a DM, or in `guild`'s `channel` by a member with `permissions`."""
        interaction_id = str(next(self._ids))
        payload = {"id": interaction_id, "application_id": APP_ID, "type": kind, "token": f"itok-{interaction_id}",
                   "version": 1, "channel_id": channel, "channel": {"id": channel, "type": 1}, "user": author,
                   "locale": locale, "attachment_size_limit": 10485760, "app_permissions": "0", "entitlements": [],
                   "authorizing_integration_owners": {"1": author["id"]}, "context": 1, "data": data}
        if guild is not None:  # in a server Discord sends the member (with their permissions), not the user
            del payload["user"]
            payload.update(guild_id=guild, context=0, guild_locale="ko",
                           channel={"id": channel, "type": 0, "guild_id": guild, "name": "general", "position": 0,
                                    "permission_overwrites": [], "nsfw": False, "parent_id": None},
                           authorizing_integration_owners={"0": guild},
                           member={"user": author, "roles": [], "joined_at": _now(), "deaf": False, "mute": False,
                                   "flags": 0, "permissions": permissions})
        if message is not None:
            payload["message"] = message
        self.interactions[interaction_id] = time.monotonic()
        await self.dispatch("INTERACTION_CREATE", payload)
        return interaction_id

    async def slash(self, author: dict, name: str, options: list[dict] | None = None, guild: str | None = None,
                    permissions: str = "0", locale: str = "ko") -> str:
        """Invoke a command the way a user can: only one offered where they are (DM or `guild`)."""
        offered = [*self.commands, *self.guild_commands.get(guild, [])] if guild else self.commands
        command = next((c for c in offered if c["name"] == name), None)
        if command is None:
            raise LookupError(f"/{name} is not offered {'in guild ' + guild if guild else 'in DMs'}")
        if not guild and 1 not in (command.get("contexts") or [0, 1, 2]):
            raise LookupError(f"/{name} is not offered in DMs (contexts {command.get('contexts')})")
        data = {"id": command["id"], "name": name, "type": 1, "options": options or []}
        if "guild_id" in command:  # a guild command says so, and the client looks it up there
            data["guild_id"] = command["guild_id"]
        return await self.interaction(author, data, guild=guild, permissions=permissions,
                                      channel="600" if guild else "500", locale=locale)

    async def click(self, author: dict, message_id: str, custom_id: str) -> str:
        return await self.interaction(author, {"custom_id": custom_id, "component_type": 2}, kind=3,
                                      message=self.messages[message_id])

    async def wait_for(self, method: str, path_part: str = "", after: int = 0, timeout: float = 60):
        """The first recorded call (index >= after) matching; returns (index, body)."""
        async def found():
            for i, (m, p, body) in enumerate(self.calls[after:], start=after):
                if m == method and path_part in p:
                    return i, body
            return None

        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: any(
                m == method and path_part in p for m, p, _ in self.calls[after:])), timeout)
        return await found()

    def count(self, method: str, path_part: str = "") -> int:
        return sum(1 for m, p, _ in self.calls if m == method and path_part in p)

    # -- REST -------------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler):
        if request.path == "/":  # the gateway websocket
            return await handler(request)
        if request.path.startswith("/api/v10") and "/interactions/" not in request.path \
                and "/webhooks/" not in request.path:
            assert request.headers.get("Authorization") == f"Bot {self.token}", request.headers.get("Authorization")
        for fragment, remaining in list(self.rate_limit_next.items()):
            if fragment in request.path and remaining > 0:
                self.rate_limit_next[fragment] = remaining - 1
                return web.Response(status=429, body=json.dumps({"message": "You are being rate limited.",
                                                                 "retry_after": 0.05, "global": False}),
                                    headers={"Content-Type": "application/json", "Retry-After": "0.05",
                                             "X-RateLimit-Scope": "user", "Via": "1.1 google"})
        body = None
        if request.can_read_body:
            raw = await request.read()
            if request.content_type == "application/json":
                body = json.loads(raw)
            elif request.content_type.startswith("multipart/"):
                body = raw  # attachments: tests look at the raw parts
        response = await handler(_WithBody(request, body))
        async with self.changed:
            self.calls.append((request.method, request.path, body))
            self.changed.notify_all()
        return response

    def _json(self, data, status: int = 200) -> web.Response:
        # discord.py reads JSON only when the content type is exactly application/json
        return web.Response(status=status, body=json.dumps(data), headers={"Content-Type": "application/json"})

    async def _no_content(self, request) -> web.Response:
        return web.Response(status=204)

    async def _app_info(self, request) -> web.Response:
        return self._json({"id": APP_ID, "name": "banryeo", "description": "", "icon": None, "bot_public": True,
                           "bot_require_code_grant": False, "owner": user(1, "owner"), "verify_key": "0" * 64,
                           "flags": 0})

    async def _gateway_bot(self, request) -> web.Response:
        return self._json({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}})

    async def _sync_commands(self, request) -> web.Response:
        self.commands = self._registered(request.body)
        return self._json(self.commands)

    async def _sync_guild_commands(self, request) -> web.Response:
        guild = request.match_info["guild"]
        self.guild_commands[guild] = [{**c, "guild_id": guild} for c in self._registered(request.body)]
        return self._json(self.guild_commands[guild])

    def _registered(self, commands) -> list[dict]:
        return [{**c, "id": str(next(self._ids)), "application_id": APP_ID, "version": "1", "type": c.get("type", 1)}
                for c in (commands or [])]

    async def _typing(self, request) -> web.Response:
        status = self.typing_status.get(request.match_info["channel"])
        if status:
            return self._json({"message": "Missing Access", "code": 50001}, status=status)
        return web.Response(status=204)

    async def _send_message(self, request) -> web.Response:
        if request.match_info["channel"] in self.blocked_channels:
            return self._json({"message": "Cannot send messages to this user", "code": 50007}, status=403)
        body = (request.body or {})
        message = self._message(request.match_info["channel"], body)
        self.messages[message["id"]] = message
        asyncio.get_running_loop().create_task(self.dispatch("MESSAGE_CREATE", message))  # echo, like Discord
        return self._json(message)

    async def _edit_message(self, request) -> web.Response:
        message = self.messages[request.match_info["message"]]
        message.update({k: v for k, v in (request.body or {}).items() if k in ("content", "components",
                                                                                      "embeds")})
        message["edited_timestamp"] = _now()
        return self._json(message)

    async def _react(self, request) -> web.Response:
        message_id = request.match_info["message"]
        emoji = request.match_info["emoji"]
        guild = self.guild_channels.get(request.match_info["channel"])
        asyncio.get_running_loop().create_task(self.react(BOT_USER["id"], message_id, emoji,
                                                          request.match_info["channel"], guild))  # echo
        return web.Response(status=204)

    async def _create_dm(self, request) -> web.Response:
        recipient = (request.body or {}).get("recipient_id")
        return self._json({"id": "500", "type": 1, "recipients": [user(int(recipient), "someone")]})

    async def _interaction_callback(self, request) -> web.Response:
        sent = self.interactions.pop(request.match_info["id"], None)
        if sent is None or time.monotonic() - sent > self.interaction_deadline:
            self.late_callbacks.append(request.match_info["id"])
            if sent is None:
                return self._json({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
            return self._json({"message": "Unknown interaction", "code": 10062}, status=404)
        body = request.body if isinstance(request.body, dict) else {}
        message = self._message("500", body.get("data") or {})
        self.messages[message["id"]] = message  # the response message, so its buttons can be clicked
        flags = (body.get("data") or {}).get("flags", 0)
        return self._json({"interaction": {"id": request.match_info["id"], "type": 2,
                                           "response_message_id": message["id"], "response_message_loading": False,
                                           "response_message_ephemeral": bool(flags & 64)},
                           "resource": {"type": body.get("type", 4), "message": message}})

    async def _followup(self, request) -> web.Response:
        body = request.body if isinstance(request.body, dict) else {}
        message = self._message("500", body)
        self.messages[message["id"]] = message  # a followup's buttons can be clicked too
        return self._json(message)

    def _message(self, channel: str, body: dict) -> dict:
        return {"id": str(next(self._ids)), "channel_id": channel, "type": 0, "content": body.get("content", ""),
                "author": BOT_USER, "timestamp": _now(), "edited_timestamp": None, "tts": False,
                "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
                "embeds": body.get("embeds", []), "pinned": False, "flags": 0,
                "components": body.get("components", [])}

    # -- gateway ----------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        self.connections += 1
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                continue
            payload = json.loads(frame.data)
            if payload["op"] == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif payload["op"] == 2:
                self.identify = payload["d"]
                await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": next(self._seq), "d": {
                    "v": 10, "user": BOT_USER, "guilds": [], "session_id": "sess-1",
                    "resume_gateway_url": self.gateway_url, "application": {"id": APP_ID, "flags": 0},
                    "private_channels": []}}))
                self.ready.set()
            elif payload["op"] == 6:  # RESUME on READY's resume_gateway_url: replay nothing, carry on
                self.resumes.append(payload["d"])
                await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": next(self._seq), "d": {}}))
                self.ready.set()
        return ws


class _WithBody:
    """The request with its JSON body already read (aiohttp bodies can be read once)."""

    def __init__(self, request: web.Request, body):
        self._request = request
        self.body = body

    def __getattr__(self, name):
        return getattr(self._request, name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
