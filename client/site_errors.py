"""What a site tells the coordinator when it does not answer a message: a fixed code, nothing else.

A ClientApp exception would reach the coordinator as Flower's error reason, which holds the
exception's text: paths, subject ids, environment values a hostile override pulled in
(``device=${oc.env:SECRET,cpu}``). ``site_errors_mod``, the outermost mod of the ClientApp,
turns every exception into an error reply whose reason is one of the fixed codes below; the
details (with the traceback) go to the site's own log only.
"""

from __future__ import annotations

import traceback
from logging import ERROR, WARNING

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

POLICY = "site-policy"  # the site's policy refuses what the run asks (overrides, caps, privacy)
DATA = "site-data"  # the site has no usable data for this message
FAILED = "site-error"  # anything else went wrong on the site
CODES = (POLICY, DATA, FAILED)


class SiteError(RuntimeError):
    """The site cannot take part (no folder configured, no usable subjects)."""

    code = DATA


class SitePolicyError(SiteError):
    """The site's own policy (its node config) refuses what the coordinator's run asks."""

    code = POLICY


def error_code(exc: BaseException) -> str:
    """The fixed code an exception is reported with."""
    return getattr(exc, "code", FAILED) if isinstance(exc, SiteError) else FAILED


def error_reply(msg: Message, code: str) -> Message:
    """An error reply carrying only ``code`` (Flower's ClientApp-exception error number)."""
    assert code in CODES
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=code), reply_to=msg)


def site_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the rest of the ClientApp; an exception becomes ``error_reply`` with its code and
    is logged here in full (the site's log: the SuperNode's or m2diff-clientapp's output)."""
    try:
        return call_next(msg, context)
    except Exception as exc:  # noqa: BLE001 - every failure must leave as a fixed code
        code = error_code(exc)
        level = WARNING if isinstance(exc, SiteError) else ERROR
        log(level, "%s message of run %s refused with %r (reply carries only the code): %s",
            msg.metadata.message_type, msg.metadata.run_id, code,
            str(exc) if isinstance(exc, SiteError) else traceback.format_exc())
        return error_reply(msg, code)
