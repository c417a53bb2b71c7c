"""Secrets out of everything the project writes or prints: the passwords and tokens a user may put
in `--optuna-storage` (a database URL), `--mlflow` (a tracking URI, `http://user:token@host` or
`...?token=...`) or a storage URI are masked in the options file, the plan, logs, reports and
error lines, while the real URL is still the one used to connect.

Why here, at the bottom: every layer prints a location at some point (an `InputError` names it,
`errors.run_cli` prints it), so the mask must be importable from all of them.

`remember` / `recall`: Ray Tune pickles the Optuna storage and the MLflow callback into the
experiment folder (`tuner.pkl`, the searcher's state). Their `__getstate__` writes the masked URL
(`tune/tuner.py`); on `--resume` the driver has been given the real URL again and `recall` puts it
back when they are unpickled in the same process.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

MASK = "***"  # what SQLAlchemy's hide_password writes
# query keys whose value is a secret (matched as substrings of the lower-cased key): token=,
# password=, secret_key=, access_key=, sig= (Azure SAS), X-Amz-Signature=, X-Amz-Credential=, ...
SECRET_KEYS = ("token", "pass", "pwd", "secret", "key", "sig", "credential", "auth")
# schemes that are not SQLAlchemy database URLs: masked by `_mask_uri` alone
WEB_SCHEMES = frozenset({"http", "https", "s3", "gs", "gcs", "file", "hdfs", "abfs", "abfss", "az", "ftp", "ftps"})
URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")

_REAL: dict[str, str] = {}  # masked URL -> the real one this process was given (`remember`)


def mask_url(url: str | None) -> str | None:
    """`url` with its password, a bare user token and secret query values replaced by `***`; a
    path or None unchanged. Database URLs go through SQLAlchemy's own masking first (it knows
    their dialect+driver forms), then through the same userinfo / query pass as any URI, which
    also catches what SQLAlchemy leaves: an unencoded `@` in a password, `?password=`."""
    if not url or "://" not in url:
        return url
    scheme = url.split("://", 1)[0].lower()
    web = scheme in WEB_SCHEMES
    return _mask_uri(url if web else _sqlalchemy_masked(url), bare_user_is_secret=web)


def _sqlalchemy_masked(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL after all (sqlalchemy.exc.ArgumentError): the URI pass only
        return url


def _mask_uri(url: str, bare_user_is_secret: bool) -> str:
    """user:password@ -> user:***@ (a bare user@ of a web URI, often a token as in
    https://TOKEN@host, -> ***@; a database's bare user name is kept), and every secret query
    value -> ***. The rest stays as written (no re-encoding, `sqlite:////abs` keeps its slashes)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced [ in the host: hide everything after the scheme
        return url.split("://", 1)[0] + "://" + MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon:
            netloc = f"{user}:{MASK}@{host}"
        elif bare_user_is_secret:
            netloc = f"{MASK}@{host}"
    query = "&".join(_mask_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def _mask_pair(pair: str) -> str:
    """One `key=value` of a query, its value masked when the key names a secret."""
    key, eq, value = pair.partition("=")
    return f"{key}={MASK}" if eq and value and _secret(unquote(key)) else pair


def _secret(key: str) -> bool:
    low = key.lower()
    return any(word in low for word in SECRET_KEYS)


def mask_text(text: str) -> str:
    """Every URL inside a free text (an error line, a log message) masked with `mask_url`."""
    def one(match: re.Match[str]) -> str:
        url = match.group(0)
        core = url.rstrip(".,:;)]}")  # the sentence's punctuation, not the URL's
        return (mask_url(core) or "") + url[len(core) :]

    return URL_IN_TEXT.sub(one, text)


def has_secret(url: str | None) -> bool:
    """True when masking changes `url`: it carries a password or token."""
    return mask_url(url) != url


def remember(*urls: str | None) -> None:
    """Keep the real form of each URL that has a secret, under its masked form (see `recall`)."""
    for url in urls:
        if url and has_secret(url):
            _REAL[mask_url(url)] = url


def recall(url: str) -> str:
    """The real URL `remember`ed under this masked one; `url` itself when none was."""
    return _REAL.get(url, url)
