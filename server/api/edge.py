"""What every route of one frontend shares: its settings, its engine client, and what the engine said of the model."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from model.config import InfoMambaConfig
from model.tokenizer import load_tokenizer
from server.api.chat_template import ChatTemplate
from server.api.errors import APIError
from server.api.validation import Validator
from server.config import ServerConfig
from server.engine.client import EngineClient
from server.metrics import EdgeMetrics

_UNSET = object()
log = logging.getLogger("infomamba.frontend")


@dataclass(eq=False)
class Edge:
    config: ServerConfig
    engine: EngineClient
    metrics: EdgeMetrics = field(default_factory=EdgeMetrics)
    tokenizer: object = _UNSET  # given (tests, embedding) or loaded from the engine's model directory
    model: InfoMambaConfig | None = None
    model_name: str = "infomamba"
    validator: Validator | None = None
    chat_template: ChatTemplate | None = None
    chat_template_error: str | None = None  # why the model directory's template did not load
    is_draining: bool = False

    def welcome(self) -> None:
        """The engine has answered: learn the model it serves."""
        info = self.engine.info
        self.model = InfoMambaConfig.from_dict(info.config)
        self.model_name = info.model_name
        if self.tokenizer is _UNSET:
            self.tokenizer = load_tokenizer(info.model_dir, self.model.vocab_size)
        self.validator = Validator(self.config, self.model, self.tokenizer)
        try:
            self.chat_template = ChatTemplate.load(info.model_dir)
        except ValueError as exc:
            self.chat_template_error = str(exc)
            log.warning("no chat completions: %s", exc)

    @property
    def is_ready(self) -> bool:
        return self.validator is not None and not self.engine.dead and not self.is_draining

    def not_ready(self) -> APIError:
        if self.engine.dead:
            return APIError(503, "engine_unavailable", "the engine process has stopped; the server is restarting",
                            retry_after=5)
        return APIError(503, "not_ready", "draining" if self.is_draining else "the model is loading; retry later",
                        retry_after=2)


class RedactSecrets(logging.Filter):
    """Access logs print request lines; a websocket's ?api_key= must not reach them."""

    PATTERN = re.compile(r"(api_key=)[^&\s\"']*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        # every request logs a record: only text with an "=" can hold a key, and most has none
        if record.args and any(isinstance(a, str) and "=" in a for a in record.args):
            record.args = tuple(self.PATTERN.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = self.PATTERN.sub(r"\1[redacted]", record.msg)
        return True
