"""A local fake of the Telegram Bot API server on 127.0.0.1 for end-to-end tests.

The real python-telegram-bot library talks to it over HTTP: point an `Application` at `base_url` and
`base_file_url`, start polling, and the fake hands out whatever updates the test pushes (user
messages, edits, media, button clicks) through long-polled `getUpdates`.

Wire protocol, as PTB 22 speaks it:
- every call is `POST /bot<TOKEN>/<method>`; the body is form-urlencoded, or multipart/form-data when
  a file is uploaded. Each value is JSON-encoded except plain strings, which are sent raw, so only
  the known non-string parameters (`JSON_PARAMS`) are JSON-decoded here: a `text` of "123" stays a
  string.
- an uploaded file is a multipart part named after its parameter (`document`, `photo`); the
  parameter then has no form field of its own. Files that the Bot API attaches by reference
  (`thumbnail`, `cover`) are parts named `attached<hex>`, and the parameter's form value is
  `attach://attached<hex>`. Either way, the decoded params hold `{"filename", "content", "mime_type"}`
  under the parameter's name.
- success is HTTP 200 with `{"ok": true, "result": ...}`; PTB maps failures by HTTP status
  (400 BadRequest, 401/404 InvalidToken, 403 Forbidden, 409 Conflict, 429 RetryAfter).

Every request is appended to `attempts` as `(method, params, status)`; the ones answered with success
also go to `calls` as `(method, params)`, which `wait_for` and `count` look at. Faults are injected
with `blocked_chats` (403) and `rate_limit_next` (429).

Simplifications: parse_mode is not applied (text is stored as sent, with only explicit entities),
length limits count code points, and message ids come from one counter shared by all chats.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

BOT_USER: dict[str, Any] = {"id": 123456, "is_bot": True, "first_name": "Banryeo", "username": "banryeo_bot",
                            "can_join_groups": True, "can_read_all_group_messages": False,
                            "supports_inline_queries": False}

# Parameters PTB sends JSON-encoded (non-string values). Everything else stays the raw string it was
# sent as; in particular text, caption, data, callback_query_id, action and parse_mode.
JSON_PARAMS = frozenset({
    "chat_id", "from_chat_id", "user_id", "message_id", "message_ids", "message_thread_id",
    "offset", "limit", "timeout", "allowed_updates", "drop_pending_updates", "max_connections",
    "reply_markup", "reply_parameters", "reply_to_message_id", "allow_sending_without_reply",
    "link_preview_options", "disable_web_page_preview", "disable_notification", "protect_content",
    "allow_paid_broadcast", "entities", "caption_entities", "show_caption_above_media", "has_spoiler",
    "disable_content_type_detection", "commands", "scope", "show_alert", "cache_time", "duration",
    "width", "height", "supports_streaming", "media", "reaction", "is_big",
})

# Update types Telegram leaves out until a bot asks for them by name in allowed_updates.
DEFAULT_EXCLUDED_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})

MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_CALLBACK_DATA = 64  # bytes
_COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")
_FILE_PATH_PREFIX = {"photo": "photos", "voice": "voice", "sticker": "stickers", "document": "documents"}


def user(user_id: int, first_name: str, language_code: str | None = None, username: str | None = None) -> dict:
    """A Telegram User object for a human."""
    data: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name}
    if username is not None:
        data["username"] = username
    if language_code is not None:
        data["language_code"] = language_code
    return data


def private_chat(of_user: dict) -> dict:
    """The private chat between the bot and a user: its id is the user's id."""
    chat = {"id": of_user["id"], "type": "private", "first_name": of_user["first_name"]}
    if "username" in of_user:
        chat["username"] = of_user["username"]
    return chat


def group(chat_id: int, title: str) -> dict:
    """A basic group chat; group ids are negative."""
    return {"id": -abs(chat_id), "type": "group", "title": title}


class ApiError(Exception):
    """A failed Bot API call, answered as `{"ok": false, ...}` with the same HTTP status."""

    def __init__(self, status: int, description: str, parameters: dict | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters


def _bad_request(reason: str) -> ApiError:
    return ApiError(400, f"Bad Request: {reason}")


class FakeTelegram:
    def __init__(self, token: str = "123456:TEST"):
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []            # successful calls only
        self.attempts: list[tuple[str, dict[str, Any], int]] = []    # every request, with its HTTP status
        self.changed = asyncio.Condition()
        self.messages: dict[int, dict] = {}                          # bot-sent messages by message_id
        self.user_messages: dict[int, dict] = {}                     # messages pushed by the test
        self.chats: dict[int, dict] = {}                             # chats seen in pushed updates
        self.commands: dict[tuple, list[dict]] = {}                  # see _scope_key
        self.files: dict[str, dict] = {}                             # file_id -> File object + "content"
        self.webhook_url = ""
        self.updates: list[dict] = []                                # pushed, not yet confirmed by offset
        self.allowed_updates: list[str] | None = None
        self.blocked_chats: set[int] = set()    # users who blocked the bot / groups it was removed from: 403
        self.rate_limit_next: dict[str, int] = {}  # method name -> how many 429s to answer first
        self.outage = False                                           # True: every call gets 502
        self._arrived = asyncio.Condition()        # wakes long-polling getUpdates
        self._closing = False
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)    # shared by user and bot messages
        self._query_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._callback_queries: set[str] = set()
        self._api: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            name[len("api_"):].lower(): getattr(self, name) for name in dir(self) if name.startswith("api_")
        }
        self.runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._closing = True
        async with self._arrived:  # release any getUpdates still being held open
            self._arrived.notify_all()
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- what tests drive -------------------------------------------------------------------------

    async def push(self, kind: str, payload: dict) -> dict:
        """Queue an update of the given type (e.g. "message") for getUpdates; returns the update."""
        update = {"update_id": next(self._update_ids), kind: payload}
        async with self._arrived:
            self.updates.append(update)
            self._arrived.notify_all()
        return update

    async def send(self, from_user: dict, text: str, chat: dict | None = None, **extra: Any) -> dict:
        """A user's text message; a leading /command gets its bot_command entity. Returns the message."""
        message = self._user_message(from_user, chat, text=text)
        if text.startswith("/"):
            word = text.split(maxsplit=1)[0]
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": _utf16_len(word)}]
        message.update(extra)
        await self.push("message", message)
        return message

    async def send_edited(self, from_user: dict, message_id: int, text: str) -> dict:
        """The user edits one of their earlier messages. Returns the edited message."""
        original = self.user_messages.get(message_id)
        chat = original["chat"] if original else private_chat(from_user)
        message = {"message_id": message_id, "date": original["date"] if original else _now(),
                   "edit_date": _now(), "chat": chat, "from": from_user, "text": text}
        if text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0,
                                    "length": _utf16_len(text.split(maxsplit=1)[0])}]
        self.user_messages[message_id] = message
        await self.push("edited_message", message)
        return message

    async def send_media(self, from_user: dict, kind: str, caption: str | None = None, chat: dict | None = None,
                         content: bytes = b"\x00fake media\x00", **extra: Any) -> dict:
        """A photo, sticker, voice note or document from the user. Returns the message.

        The file is registered, so the bot can getFile and download `content`."""
        file = self._register_file(kind, content, file_name="report.pdf" if kind == "document" else None,
                                   mime_type={"voice": "audio/ogg", "document": "application/pdf"}.get(kind))
        ref = {"file_id": file["file_id"], "file_unique_id": file["file_unique_id"], "file_size": len(content)}
        if kind == "photo":
            media: Any = [{**ref, "width": 90, "height": 67}, {**ref, "width": 320, "height": 240}]
        elif kind == "sticker":
            media = {**ref, "type": "regular", "width": 512, "height": 512, "is_animated": False,
                     "is_video": False, "emoji": "😀"}
        elif kind == "voice":
            media = {**ref, "duration": 3, "mime_type": "audio/ogg"}
        elif kind == "document":
            media = {**ref, "file_name": "report.pdf", "mime_type": "application/pdf"}
        else:
            raise ValueError(f"unknown media kind {kind!r}: use photo, sticker, voice or document")
        message = self._user_message(from_user, chat, **{kind: media})
        if caption is not None:
            message["caption"] = caption
        message.update(extra)
        await self.push("message", message)
        return message

    async def click(self, from_user: dict, message_id: int, data: str, chat: dict | None = None) -> dict:
        """The user presses an inline button of a message the bot sent. Returns the callback query.

        Like a real client, only a button that is on the message (with that callback_data) can be pressed."""
        message = self.messages.get(message_id)
        if message is None or (chat is not None and message["chat"]["id"] != chat["id"]):
            raise LookupError(f"the bot sent no message {message_id}" + (f" in chat {chat['id']}" if chat else ""))
        buttons = [b.get("callback_data") for row in message.get("reply_markup", {}).get("inline_keyboard", [])
                   for b in row]
        if data not in buttons:
            raise ValueError(f"message {message_id} has no button with callback_data {data!r} (it has {buttons})")
        return await self.click_raw(from_user, message, data)

    async def click_raw(self, from_user: dict, message: dict, data: str) -> dict:
        """A callback query carrying any message (forged, foreign, stale); nothing is checked."""
        query_id = str(4_000_000_000_000_000 + next(self._query_ids))
        self._callback_queries.add(query_id)
        query = {"id": query_id, "from": from_user, "chat_instance": f"ci{message['chat']['id']}",
                 "data": data, "message": copy.deepcopy(message)}
        await self.push("callback_query", query)
        return query

    async def wait_for(self, method: str, after: int = 0, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        """The first successful call of `method` with index >= after; returns (index, params)."""
        def found() -> tuple[int, dict[str, Any]] | None:
            for i, (m, params) in enumerate(self.calls[after:], start=after):
                if m == method:
                    return i, params
            return None

        return await self._wait_until_found(found, timeout)

    async def wait_attempt(self, method: str, after: int = 0,
                           timeout: float = 60) -> tuple[int, dict[str, Any], int]:
        """Like wait_for, over `attempts` (errors included); returns (index, params, status)."""
        def found() -> tuple[int, dict[str, Any], int] | None:
            for i, (m, params, status) in enumerate(self.attempts[after:], start=after):
                if m == method:
                    return i, params, status
            return None

        return await self._wait_until_found(found, timeout)

    async def _wait_until_found(self, found, timeout: float):
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: found() is not None), timeout)
        result = found()
        assert result is not None
        return result

    async def wait_answered(self, callback_query_id: str, timeout: float = 60) -> dict[str, Any]:
        """The answerCallbackQuery params for that query, once the bot has answered it."""
        def found() -> dict[str, Any] | None:
            return next((p for m, p in self.calls
                         if m == "answerCallbackQuery" and p.get("callback_query_id") == callback_query_id), None)

        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: found() is not None), timeout)
        result = found()
        assert result is not None
        return result

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)

    def commands_for(self, scope_type: str = "default", language_code: str | None = None,
                     chat_id: int | None = None, user_id: int | None = None) -> list[dict]:
        """The commands last set for exactly this scope and language ([] when none)."""
        scope: dict[str, Any] = {"type": scope_type}
        if chat_id is not None:
            scope["chat_id"] = chat_id
        if user_id is not None:
            scope["user_id"] = user_id
        return self.commands.get(_scope_key(scope, language_code), [])

    # -- HTTP -------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        method_name = request.match_info["method"]
        handler = self._api.get(method_name.lower())
        method = handler.__name__[len("api_"):] if handler else method_name
        params = await self._decode(request)
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            if handler is None:
                raise ApiError(404, "Not Found")
            if self.outage:  # the Bot API unreachable behind its proxy, as in a network outage
                raise ApiError(502, "Bad Gateway")
            if self.rate_limit_next.get(method, 0) > 0:
                self.rate_limit_next[method] -= 1
                raise ApiError(429, "Too Many Requests: retry after 1", {"retry_after": 1})
            result = await handler(params)
        except ApiError as error:
            await self._record(method, params, error.status)
            body: dict[str, Any] = {"ok": False, "error_code": error.status, "description": error.description}
            if error.parameters:
                body["parameters"] = error.parameters
            return web.json_response(body, status=error.status)
        await self._record(method, params, 200)
        return web.json_response({"ok": True, "result": result})

    async def _record(self, method: str, params: dict[str, Any], status: int) -> None:
        async with self.changed:
            self.attempts.append((method, params, status))
            if status == 200:
                self.calls.append((method, params))
            self.changed.notify_all()

    async def _decode(self, request: web.Request) -> dict[str, Any]:
        """Form fields, JSON-decoded where PTB JSON-encodes them; uploads as {"filename", "content", ...}."""
        if not request.can_read_body:
            return {}
        form = await request.post()
        params: dict[str, Any] = {}
        files: dict[str, dict[str, Any]] = {}
        for key, value in form.items():
            if isinstance(value, web.FileField):
                files[key] = {"filename": value.filename, "content": value.file.read(),
                              "mime_type": value.content_type}
            elif key in JSON_PARAMS:
                try:
                    params[key] = json.loads(value)
                except ValueError:
                    params[key] = value  # e.g. chat_id="@channelname"
            else:
                params[key] = value
        for key, value in list(params.items()):  # thumbnail="attach://attached<hex>" and the like
            if isinstance(value, str) and value.startswith("attach://") and value[9:] in files:
                params[key] = files.pop(value[9:])
        params.update(files)
        return params

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        file = next((f for f in self.files.values() if f["file_path"] == request.match_info["path"]), None)
        if file is None:
            return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)
        return web.Response(body=file["content"], content_type="application/octet-stream")

    # -- Bot API methods (api_<methodName>) -------------------------------------------------------

    async def api_getMe(self, params: dict[str, Any]) -> dict:
        return BOT_USER

    async def api_setWebhook(self, params: dict[str, Any]) -> bool:
        self.webhook_url = params.get("url", "")
        return True

    async def api_deleteWebhook(self, params: dict[str, Any]) -> bool:
        self.webhook_url = ""
        if params.get("drop_pending_updates"):
            self.updates.clear()
        return True

    async def api_getWebhookInfo(self, params: dict[str, Any]) -> dict:
        return {"url": self.webhook_url, "has_custom_certificate": False, "pending_update_count": len(self.updates)}

    async def api_getUpdates(self, params: dict[str, Any]) -> list[dict]:
        if self.webhook_url:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        if "allowed_updates" in params:  # remembered until changed; [] means the default set
            self.allowed_updates = params["allowed_updates"] or None
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        async with self._arrived:
            self._prune(offset)
            if not self.updates and timeout > 0 and not self._closing:
                try:
                    await asyncio.wait_for(
                        self._arrived.wait_for(lambda: bool(self.updates) or self._closing), timeout)
                except asyncio.TimeoutError:
                    pass
                self._prune(offset)
            return copy.deepcopy(self.updates[:limit])

    async def api_sendMessage(self, params: dict[str, Any]) -> dict:
        chat = self._target_chat(params)
        text = params.get("text", "")
        if not text.strip():
            raise _bad_request("message text is empty")
        if len(text) > MAX_TEXT:
            raise _bad_request("message is too long")
        message = self._bot_message(chat, params, text=text)
        if params.get("entities"):
            message["entities"] = params["entities"]
        return message

    async def api_editMessageText(self, params: dict[str, Any]) -> dict | bool:
        if "inline_message_id" in params:
            return True
        message = self._message_to_edit(params)
        text = params.get("text", "")
        if "text" not in message:
            raise _bad_request("there is no text in the message to edit")
        if not text.strip():
            raise _bad_request("message text is empty")
        if len(text) > MAX_TEXT:
            raise _bad_request("message is too long")
        markup = self._inline_markup(params)
        if text == message["text"] and markup == message.get("reply_markup"):
            raise _bad_request("message is not modified: specified new message content and reply markup are "
                               "exactly the same as a current content and reply markup of the message")
        message["text"] = text
        if params.get("entities"):
            message["entities"] = params["entities"]
        else:
            message.pop("entities", None)
        self._set_markup(message, markup)
        return copy.deepcopy(message)

    async def api_editMessageReplyMarkup(self, params: dict[str, Any]) -> dict | bool:
        if "inline_message_id" in params:
            return True
        message = self._message_to_edit(params)
        markup = self._inline_markup(params)
        if markup == message.get("reply_markup"):
            raise _bad_request("message is not modified: specified new message content and reply markup are "
                               "exactly the same as a current content and reply markup of the message")
        self._set_markup(message, markup)
        return copy.deepcopy(message)

    async def api_answerCallbackQuery(self, params: dict[str, Any]) -> bool:
        if params.get("callback_query_id") not in self._callback_queries:
            raise _bad_request("query is too old and response timeout expired or query ID is invalid")
        return True

    async def api_sendChatAction(self, params: dict[str, Any]) -> bool:
        self._target_chat(params)
        return True

    async def api_setMyCommands(self, params: dict[str, Any]) -> bool:
        commands = params.get("commands") or []
        for command in commands:
            if not _COMMAND_NAME.fullmatch(str(command.get("command", ""))):
                raise _bad_request("BOT_COMMAND_INVALID")
            if not str(command.get("description", "")).strip():
                raise _bad_request("command description must be non-empty")
        self.commands[_scope_key(params.get("scope"), params.get("language_code"))] = commands
        return True

    async def api_getMyCommands(self, params: dict[str, Any]) -> list[dict]:
        return self.commands.get(_scope_key(params.get("scope"), params.get("language_code")), [])

    async def api_deleteMyCommands(self, params: dict[str, Any]) -> bool:
        self.commands.pop(_scope_key(params.get("scope"), params.get("language_code")), None)
        return True

    async def api_sendDocument(self, params: dict[str, Any]) -> dict:
        chat = self._target_chat(params)
        file = self._file_param(params, "document")
        document = {k: file[k] for k in ("file_id", "file_unique_id", "file_name", "mime_type", "file_size")
                    if k in file}
        return self._bot_message(chat, params, document=document, **self._caption(params))

    async def api_sendPhoto(self, params: dict[str, Any]) -> dict:
        chat = self._target_chat(params)
        file = self._file_param(params, "photo")
        size = {"file_id": file["file_id"], "file_unique_id": file["file_unique_id"],
                "file_size": file["file_size"]}
        photo = [{**size, "width": 90, "height": 90}, {**size, "width": 320, "height": 320}]
        return self._bot_message(chat, params, photo=photo, **self._caption(params))

    async def api_getFile(self, params: dict[str, Any]) -> dict:
        file = self.files.get(str(params.get("file_id")))
        if file is None:
            raise _bad_request("invalid file_id")
        return {k: v for k, v in file.items() if k != "content"}

    # -- helpers ----------------------------------------------------------------------------------

    def _user_message(self, from_user: dict, chat: dict | None, **content: Any) -> dict:
        chat = chat or private_chat(from_user)
        self.chats[chat["id"]] = chat
        message = {"message_id": next(self._message_ids), "date": _now(), "chat": chat, "from": from_user,
                   **content}
        self.user_messages[message["message_id"]] = message
        return message

    def _target_chat(self, params: dict[str, Any]) -> dict:
        """The chat a call addresses; 403 when it is blocked. Chats never seen are made up from the id."""
        chat_id = params.get("chat_id")
        if not isinstance(chat_id, int):
            raise _bad_request("chat not found")
        if chat_id in self.blocked_chats:
            raise ApiError(403, "Forbidden: bot was blocked by the user" if chat_id > 0
                           else "Forbidden: bot was kicked from the group chat")
        if chat_id not in self.chats:
            self.chats[chat_id] = ({"id": chat_id, "type": "private", "first_name": f"User{chat_id}"} if chat_id > 0
                                   else group(chat_id, f"Group {-chat_id}"))
        return self.chats[chat_id]

    def _bot_message(self, chat: dict, params: dict[str, Any], **content: Any) -> dict:
        message: dict[str, Any] = {"message_id": next(self._message_ids), "from": BOT_USER, "chat": chat,
                                   "date": _now(), **content}
        replied = (params.get("reply_parameters") or {}).get("message_id") or params.get("reply_to_message_id")
        original = self.messages.get(replied) or self.user_messages.get(replied)
        if original is not None:
            message["reply_to_message"] = {k: v for k, v in original.items() if k != "reply_to_message"}
        self._set_markup(message, self._inline_markup(params))
        self.messages[message["message_id"]] = message
        return copy.deepcopy(message)

    def _message_to_edit(self, params: dict[str, Any]) -> dict:
        self._target_chat(params)
        message = self.messages.get(params.get("message_id"))
        if message is None or message["chat"]["id"] != params.get("chat_id"):
            raise _bad_request("message to edit not found")
        return message

    @staticmethod
    def _inline_markup(params: dict[str, Any]) -> dict | None:
        """The inline keyboard a call attaches; other keyboards are not part of the returned Message."""
        markup = params.get("reply_markup")
        if not isinstance(markup, dict) or "inline_keyboard" not in markup:
            return None
        for row in markup["inline_keyboard"]:
            for button in row:
                data = button.get("callback_data")
                if data is not None and not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA:
                    raise _bad_request("BUTTON_DATA_INVALID")
        return markup

    @staticmethod
    def _set_markup(message: dict, markup: dict | None) -> None:
        if markup is None:
            message.pop("reply_markup", None)  # an edit without reply_markup removes the keyboard
        else:
            message["reply_markup"] = markup

    @staticmethod
    def _caption(params: dict[str, Any]) -> dict[str, Any]:
        caption = params.get("caption")
        if not caption:
            return {}
        if len(caption) > MAX_CAPTION:
            raise _bad_request("message caption is too long")
        content: dict[str, Any] = {"caption": caption}
        if params.get("caption_entities"):
            content["caption_entities"] = params["caption_entities"]
        return content

    def _file_param(self, params: dict[str, Any], kind: str) -> dict:
        """The File for an upload ({"filename", "content", ...}) or for a file_id sent earlier."""
        value = params.get(kind)
        if isinstance(value, dict) and "content" in value:
            return self._register_file(kind, value["content"], value["filename"], value.get("mime_type"))
        if isinstance(value, str) and value in self.files:
            return self.files[value]
        raise _bad_request("wrong remote file identifier specified: can't unserialize it")

    def _register_file(self, kind: str, content: bytes, file_name: str | None = None,
                       mime_type: str | None = None) -> dict:
        n = next(self._file_ids)
        file: dict[str, Any] = {"file_id": f"{kind[:2].upper()}AAC{n:06d}", "file_unique_id": f"AQAD{n:06d}",
                                "file_size": len(content),
                                "file_path": f"{_FILE_PATH_PREFIX.get(kind, 'documents')}/file_{n}",
                                "content": content}
        if file_name is not None:
            file["file_name"] = file_name
        if mime_type is not None:
            file["mime_type"] = mime_type
        self.files[file["file_id"]] = file
        return file

    def _prune(self, offset: int) -> None:
        """Forget updates confirmed by `offset` and those of types the bot did not ask for."""
        def wanted(update: dict) -> bool:
            kind = next(k for k in update if k != "update_id")
            if self.allowed_updates is None:
                return kind not in DEFAULT_EXCLUDED_UPDATES
            return kind in self.allowed_updates

        self.updates = [u for u in self.updates if u["update_id"] >= offset and wanted(u)]


def _scope_key(scope: dict | None, language_code: str | None) -> tuple:
    scope = scope or {"type": "default"}
    return scope.get("type", "default"), scope.get("chat_id"), scope.get("user_id"), language_code or ""


def _utf16_len(text: str) -> int:
    """Telegram measures entity offsets and lengths in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def _now() -> int:
    return int(time.time())
