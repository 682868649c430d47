"""OpenAI's Responses API as a dialect: the request becomes a chat completions body
(`responses_request`), the chat answer a Response object or its event stream.

A stored response carries the whole conversation up to it (`ResponseStore`), so
`previous_response_id` continues it with one read, and an expired ancestor never breaks a
chain. Instructions are not carried over: OpenAI's rule, so a client can change them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.api.errors import error_payload
from gateway.dialects import DialectContext, ErrorAnswer
from gateway.dialects.response_store import ResponseStore
from gateway.dialects.responses_answer import (
    failure_code,
    finish_state,
    function_call_item,
    item_id,
    message_item,
    output_items,
    output_text_part,
    reasoning_item,
    reasoning_text,
    response_frame,
    usage,
)
from gateway.dialects.responses_request import chat_body, check_request, input_items
from gateway.errors import NotFound, TriageError

__all__ = ["ResponseTranslation", "ResponsesDialect", "response_id"]


class ResponsesDialect:
    name = "responses"

    def parse(self, body: dict[str, Any]) -> dict[str, Any]:
        return chat_body(body)

    async def expand(
        self, body: dict[str, Any], context: DialectContext, store: ResponseStore
    ) -> tuple[dict[str, Any], str | None]:
        """`body` with the conversation `previous_response_id` names put before its input
        (that response's input items, then its output), and that conversation's id: its
        first response's, which is this one's when it starts a stored conversation (so the
        first turn has the session its followers will). `NotFound` when the caller's
        tenant has no such response. The body is checked first: bad input reads nothing."""
        request = check_request(body)
        previous_id = request.previous_response_id
        if previous_id is None:
            starts = body.get("store", True) is not False
            return body, response_id(context) if starts else None
        record = await store.load(context.scope, previous_id)
        if record is None:
            raise NotFound(
                f"Previous response with id '{previous_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history = [*record["input"], *record["response"]["output"]]
        conversation = record.get("conversation") or previous_id
        return {**body, "input": [*history, *input_items(body)]}, conversation

    def translation(self, body: Mapping[str, Any], context: DialectContext) -> ResponseTranslation:
        return ResponseTranslation(body, context)

    def error(self, error: TriageError) -> ErrorAnswer:
        headers: dict[str, str] = {}
        if error.retry_after is not None:
            headers["retry-after"] = str(max(0, math.ceil(error.retry_after)))
        return ErrorAnswer(error.status_code, orjson.dumps(error_payload(error)), headers)


def response_id(context: DialectContext) -> str:
    """The id of the Response a request gets, translated or passed through."""
    return f"resp_{context.request_id}"


_Kind = Literal["reasoning", "message", "function_call"]
_TEXT_DELTA = {
    "reasoning": "response.reasoning_text.delta",
    "message": "response.output_text.delta",
}
_EVENT_HEADS = {
    name: b"event: " + name.encode() + b"\ndata: "
    for name in (*_TEXT_DELTA.values(), "response.function_call_arguments.delta")
}


@dataclass(slots=True)
class _Item:
    """An output item being streamed: its text (or arguments) so far, kept in pieces:
    `text += delta` on an attribute copies the whole text at every delta."""

    kind: _Kind
    index: int
    id: str
    pieces: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    open: bool = True

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class ResponseTranslation:
    """One request's answer as a Response object, or as its event stream.

    The stream is a state machine over chat chunks: a text-like item (reasoning, message)
    stays open while its kind of delta keeps coming, a function call while its deltas do;
    the finish reason closes what is open, and the usage chunk (or `[DONE]`) ends the
    response with `response.completed` (`response.incomplete` when cut short).
    """

    def __init__(self, body: Mapping[str, Any], context: DialectContext) -> None:
        self._body = body
        self._rid = context.request_id
        self._frame = response_frame(body, response_id(context), int(time.time()))
        self._store = body.get("store", True) is not False
        self._seq = 0
        self._pending = b""
        self._started = False
        self._ended = False
        self._items: list[_Item] = []
        self._text_item: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self._finish: str | None = None
        self._finished = False
        self._usage: dict[str, Any] | None = None
        self._final: dict[str, Any] | None = None

    # --- the stored record ------------------------------------------------------------

    def stored(self) -> dict[str, Any] | None:
        """What `ResponseStore.save` keeps: the finished Response and the conversation's
        input items up to it. None when the client said `store: false` or the answer did
        not finish (a failed or cut stream)."""
        if not self._store or self._final is None:
            return None
        return {"id": self._frame["id"], "response": self._final, "input": input_items(self._body)}

    # --- JSON -------------------------------------------------------------------------

    def json(self, chat: bytes) -> bytes:
        completion = orjson.loads(chat)
        choices = completion.get("choices") or [{}]
        choice = choices[0]
        finish = choice.get("finish_reason")
        status, incomplete = finish_state(finish)
        response = self._response(status, completion.get("model"))
        response["output"] = output_items(choice.get("message") or {}, finish, self._rid)
        response["incomplete_details"] = incomplete
        response["usage"] = usage(completion.get("usage"))
        self._final = response
        return orjson.dumps(response)

    def _response(self, status: str, model: object) -> dict[str, Any]:
        response = dict(self._frame)
        response["status"] = status
        if isinstance(model, str) and model:
            response["model"] = model
        if status == "completed":
            response["completed_at"] = int(time.time())
        return response

    # --- the stream -------------------------------------------------------------------

    def events(self, chat_events: bytes) -> bytes:
        # A batch normally holds whole events; a partial one waits for the next batch.
        data = self._pending + chat_events
        *complete, self._pending = data.split(b"\n\n")
        out: list[bytes] = []
        for event in complete:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:") or self._ended:
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self._close_all(out)
                    self._complete(out)
                else:
                    self._chunk(orjson.loads(payload), out)
        return b"".join(out)

    def error_event(self, error: TriageError) -> bytes:
        out: list[bytes] = []
        if not self._ended:
            self._fail(error.code, error.error_type, error.message, error.param, out)
        return b"".join(out)

    def _emit(self, out: list[bytes], kind: str, fields: dict[str, Any]) -> None:
        event = {"type": kind, **fields, "sequence_number": self._seq}
        self._seq += 1
        head = _EVENT_HEADS.get(kind) or b"event: " + kind.encode() + b"\ndata: "
        out.append(head + orjson.dumps(event) + b"\n\n")

    def _start(self, out: list[bytes], model: object) -> None:
        if self._started:
            return
        self._started = True
        if isinstance(model, str) and model:
            self._frame["model"] = model
        self._emit(out, "response.created", {"response": self._frame})
        self._emit(out, "response.in_progress", {"response": self._frame})

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        error = chunk.get("error")
        if isinstance(error, Mapping):
            message = error.get("message")
            param = error.get("param")
            self._fail(
                error.get("code"),
                error.get("type"),
                message if isinstance(message, str) else "The backend failed.",
                param if isinstance(param, str) else None,
                out,
            )
            return
        self._start(out, chunk.get("model"))
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if reasoning := reasoning_text(delta):
                self._text("reasoning", reasoning, out)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._text("message", content, out)
            for call in delta.get("tool_calls") or []:
                self._call(call, out)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                self._close_all(out)
        if chunk.get("usage"):
            self._usage = usage(chunk["usage"])
            if self._finished:
                self._complete(out)

    def _open(self, kind: _Kind, out: list[bytes], call_id: str = "", name: str = "") -> _Item:
        index = len(self._items)
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        item = _Item(kind, index, item_id(prefix, self._rid, index), call_id=call_id, name=name)
        self._items.append(item)
        added = self._item(item, "in_progress")
        if kind != "function_call":
            added["content"] = []  # its part comes with `response.content_part.added`
        self._emit(out, "response.output_item.added", _at(item, item=added))
        if kind != "function_call":
            part = _part(item)
            self._emit(out, "response.content_part.added", _at(item, content_index=0, part=part))
        return item

    def _text(self, kind: _Kind, text: str, out: list[bytes]) -> None:
        item = self._text_item
        if item is None or item.kind != kind or not item.open:
            self._close_last(out)
            item = self._text_item = self._open(kind, out)
        item.pieces.append(text)
        # The one event of every token: its JSON written as `_emit` would, without the
        # dicts `_at` and `_emit` build on the way (~15 % of the time per token).
        name = _TEXT_DELTA[kind]
        event = {
            "type": name,
            "item_id": item.id,
            "output_index": item.index,
            "content_index": 0,
            "delta": text,
        }
        if kind == "message":
            event["logprobs"] = []
        event["sequence_number"] = self._seq
        self._seq += 1
        out.append(_EVENT_HEADS[name] + orjson.dumps(event) + b"\n\n")

    def _call(self, call: Mapping[str, Any], out: list[bytes]) -> None:
        position = call.get("index", 0)
        function = call.get("function") or {}
        item = self._calls.get(position)
        if item is None:
            self._close_last(out)  # chat streams one tool call after another
            index = len(self._items)
            call_id = call.get("id") or item_id("call", self._rid, index)
            item = self._open(
                "function_call", out, call_id=call_id, name=function.get("name") or ""
            )
            self._calls[position] = item
        elif not item.name and function.get("name"):
            item.name = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.pieces.append(arguments)
            if item.open:  # a late piece of an earlier call still counts in the final answer
                delta = _at(item, delta=arguments)
                self._emit(out, "response.function_call_arguments.delta", delta)

    def _close_last(self, out: list[bytes]) -> None:
        """A new item begins: the one before it is done."""
        if self._items and self._items[-1].open:
            self._close(self._items[-1], "completed", out)

    def _close(self, item: _Item, status: str, out: list[bytes]) -> None:
        item.open = False
        if item.kind == "function_call":
            done = _at(item, arguments=item.text)
            self._emit(out, "response.function_call_arguments.done", done)
        else:
            if item.kind == "reasoning":
                name, fields = (
                    "response.reasoning_text.done",
                    _at(item, content_index=0, text=item.text),
                )
            else:
                name = "response.output_text.done"
                fields = _at(item, content_index=0, text=item.text, logprobs=[])
            self._emit(out, name, fields)
            self._emit(
                out, "response.content_part.done", _at(item, content_index=0, part=_part(item))
            )
        self._emit(out, "response.output_item.done", _at(item, item=self._item(item, status)))

    def _close_all(self, out: list[bytes]) -> None:
        """The finish: what is open is closed, the last item with the finish's status.
        An answer with neither text nor tool calls still gets its (empty) message."""
        if self._finished:
            return
        self._finished = True
        self._start(out, None)
        status, _ = finish_state(self._finish)
        open_items = [item for item in self._items if item.open]
        if not any(item.kind != "reasoning" for item in self._items):
            for item in open_items:
                self._close(item, "completed", out)
            self._close(self._open("message", out), status, out)
            return
        for item in open_items:
            self._close(item, status if item is self._items[-1] else "completed", out)

    def _complete(self, out: list[bytes]) -> None:
        self._ended = True
        status, incomplete = finish_state(self._finish)
        response = self._response(status, self._frame["model"])
        response["output"] = [
            self._item(item, self._status_of(item, status)) for item in self._items
        ]
        response["incomplete_details"] = incomplete
        response["usage"] = self._usage
        self._final = response
        kind = "response.completed" if status == "completed" else "response.incomplete"
        self._emit(out, kind, {"response": response})

    def _status_of(self, item: _Item, final: str) -> str:
        return final if item is self._items[-1] else "completed"

    def _fail(
        self, code: object, error_type: object, message: str, param: str | None, out: list[bytes]
    ) -> None:
        """The stream's end after a failure: an `error` event with the gateway's own code,
        then `response.failed` with what was produced so far, marked incomplete."""
        self._start(out, None)
        self._ended = True
        fields = {
            "code": code if isinstance(code, str) else None,
            "message": message,
            "param": param,
        }
        self._emit(out, "error", fields)
        response = self._response("failed", self._frame["model"])
        response["output"] = [self._item(item, "incomplete") for item in self._items]
        response["error"] = {"code": failure_code(code, error_type), "message": message}
        response["usage"] = self._usage
        self._emit(out, "response.failed", {"response": response})

    def _item(self, item: _Item, status: str) -> dict[str, Any]:
        if item.kind == "reasoning":
            return reasoning_item(item.id, item.text, status)
        if item.kind == "message":
            return message_item(item.id, item.text, status)
        return function_call_item(item.id, item.call_id, item.name, item.text, status)


def _at(where: _Item, /, **fields: Any) -> dict[str, Any]:
    """An item event's fields: where the item is, then what happened to it."""
    if "item" in fields:
        return {"output_index": where.index, **fields}
    return {"item_id": where.id, "output_index": where.index, **fields}


def _part(item: _Item) -> dict[str, Any]:
    if item.kind == "reasoning":
        return {"type": "reasoning_text", "text": item.text}
    return output_text_part(item.text)
