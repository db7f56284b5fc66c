"""One HTTP POST of a JSON document (FHIR or webhook), reported as a NotifyResult.

Success is any 2xx (RFC 9110 15.3). Redirects are not followed: a POST that is answered
with a redirect is a configuration problem the administrator should see, and following it
would carry the bearer token to another place. Proxies come from the usual environment
variables (``HTTPS_PROXY``, ``NO_PROXY``), as hospital networks often require.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from ddn_node import __version__
from ddn_node.notify.summary import NotifyResult

MAX_ERROR_TEXT = 300


@dataclass(frozen=True)
class PostOutcome:
    result: NotifyResult
    failure: str  # for the log: "", "http", "timeout", "connect", "transport"


def _detail(response: httpx.Response) -> str:
    """A short reason from the answer: OperationOutcome diagnostics, else the text body."""
    text = response.text.strip()
    if not text:
        return ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in body.get("issue", []):
            if not isinstance(issue, dict):
                continue
            details = issue.get("details")
            detail_text = details.get("text") if isinstance(details, dict) else None
            said = issue.get("diagnostics") or detail_text or issue.get("code")
            if said:
                parts.append(f"{issue.get('severity', 'error')}: {said}")
        if parts:
            text = "; ".join(parts)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def post(
    url: str,
    payload: bytes,
    content_type: str,
    accept: str,
    bearer_token: str,
    timeout_s: float,
    extra_headers: Mapping[str, str] | None = None,
) -> PostOutcome:
    """POST ``payload`` once; never raises for network or HTTP errors."""
    if not url:
        return PostOutcome(NotifyResult(ok=False, status=None, error="no URL configured"), "config")
    headers = {
        "Content-Type": content_type,
        "Accept": accept,
        "User-Agent": f"ddn-node/{__version__}",
        **(extra_headers or {}),
    }
    if bearer_token:
        headers["Authorization"] = f"Bearer {bearer_token}"
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            response = client.post(url, content=payload, headers=headers)
    except httpx.TimeoutException as exc:
        what = "connecting" if isinstance(exc, httpx.ConnectTimeout) else "waiting for the answer"
        return PostOutcome(
            NotifyResult(ok=False, status=None, error=f"timed out after {timeout_s:g} s {what}"),
            "timeout",
        )
    except httpx.ConnectError as exc:
        return PostOutcome(
            NotifyResult(ok=False, status=None, error=f"cannot connect: {exc}"), "connect"
        )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return PostOutcome(
            NotifyResult(ok=False, status=None, error=f"{type(exc).__name__}: {exc}"), "transport"
        )
    except (UnicodeError, ValueError) as exc:
        # A header or host that cannot be encoded (a non-ASCII token, say). The exception's
        # text may quote the value, and the value may be the token: name the type only.
        return PostOutcome(
            NotifyResult(
                ok=False,
                status=None,
                error=f"invalid request ({type(exc).__name__}): check the URL and the token",
            ),
            "config",
        )
    if 200 <= response.status_code < 300:
        return PostOutcome(NotifyResult(ok=True, status=response.status_code, error=""), "")
    detail = _detail(response)
    error = f"HTTP {response.status_code} {response.reason_phrase}".strip() + (
        f": {detail}" if detail else ""
    )
    return PostOutcome(NotifyResult(ok=False, status=response.status_code, error=error), "http")
