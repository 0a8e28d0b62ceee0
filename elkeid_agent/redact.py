"""Credentials out of text before it leaves the process (pure).

A URL may carry `user:password@` (a proxy variable, a download URL a server pushed). Anything
the agent prints or sends (log lines, `state_detail`, heartbeats, `status.json`, diagnostics)
passes through `redact` at the sink, so no single message has to remember it.

The rule is deliberately wider than RFC 3986's userinfo: from `scheme://` to the LAST `@`
before the next blank or quote. A password may hold `/`, `?`, `#` or `:` (malformed, yet what
an operator typed), and then urllib sees a host and path where a password was; cutting to the
last `@` hides all of it. A URL with an `@` in its path loses its host in the text too, a
price paid for never showing a password.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MASK = "***"
# The scan for `@` is bounded (USERINFO_MAX) so that text with many `://` and no blank costs
# linear time, not quadratic; no real userinfo comes near it. The scheme starts at any letter
# not after a letter (not `\b`): a URL glued to a digit or `_` (`error_http://...`) has a
# password all the same.
USERINFO_MAX = 1024
_USERINFO = re.compile(rf"(?i)(?<![a-z])([a-z][a-z0-9+.-]{{0,15}}://)[^\s'\"<>`]{{0,{USERINFO_MAX}}}@")
# The fields of a config or environment whose values are secrets whatever they look like.
_SECRET_NAME = re.compile(r"(?i)(passw|secret|token|credential|api_?key|private)")


def redact(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced by `***`."""
    if "@" not in text:
        return text
    return _USERINFO.sub(rf"\1{MASK}@", text)


def secret_name(name: str) -> bool:
    """Whether a key or variable name says its value is a secret."""
    return _SECRET_NAME.search(name) is not None


def redact_mapping(values: Mapping[str, str]) -> dict[str, str]:
    """Every value redacted; values of secret-named keys removed whole."""
    return {k: MASK if secret_name(k) and v else redact(v) for k, v in values.items()}
