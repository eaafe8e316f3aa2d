"""What we print about servers: URLs without their passwords, driver messages without secrets, one line."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

# Query parameters that carry a secret (libpq's `password`, `sslpassword`; redis-py's `password`).
_SECRET_PARAMS = frozenset({"password", "sslpassword", "pass", "pwd"})
# libpq's keyword/value form (`host=db password=s3cret`): a secret's value as written, quoted or not.
_KEYWORD_SECRET = re.compile(r"\b(password|sslpassword)(\s*=\s*)('(?:\\.|[^'\\])*'|\S*)", re.IGNORECASE)


def one_line(text: str) -> str:
    """A message as one line: driver messages carry DETAIL/CONTEXT lines, field names may hold newlines."""
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def _is_secret_param(part: str) -> bool:
    """Whether one `key=value` of a query string carries a secret."""
    return unquote(part.partition("=")[0]).lower() in _SECRET_PARAMS


def _secrets(url: str) -> list[str]:
    """The password in a URL, as written (a driver may echo a token it could not decode) and decoded."""
    if "://" not in url:
        found = [m.group(3) for m in _KEYWORD_SECRET.finditer(url)]
        return [s for raw in found for s in {raw, raw.strip("'")} if len(s) >= 3]
    rest = url.partition("://")[2]
    authority, _, query = rest.partition("?")
    userinfo = authority.partition("/")[0].rpartition("@")[0]
    found = [userinfo.partition(":")[2]] if ":" in userinfo else []
    found.extend(part.partition("=")[2] for part in query.split("&") if _is_secret_param(part))
    return [s for raw in found for s in {raw, unquote(raw)} if len(s) >= 3]


def driver_text(exc: BaseException, *urls: str) -> str:
    """A driver's error message as one line, without any password of `urls` in it."""
    text = one_line(str(exc))
    for secret in sorted((s for url in urls for s in _secrets(url)), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def mask_url(url: str) -> str:
    """The URL with its password replaced by `***` (in the user-info part and in query parameters), for
    logs, error messages and `stats`. A libpq keyword/value string has its `password=` masked."""
    if "://" not in url:
        return _KEYWORD_SECRET.sub(r"\1\2***", url)
    try:
        # No fragments: libpq and redis-py read a `#` as part of the value (`?password=ab#cd`).
        parts = urlsplit(url, allow_fragments=False)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "<unparseable URL>"
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        query = "&".join(
            f"{p.partition('=')[0]}=***" if _is_secret_param(p) else p for p in parts.query.split("&")
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)
