"""Reviewer accounts on a Label Studio open-source server, for the demo's simulated reviewers and the tests.

The open-source edition makes accounts one way only: the organisation's invite link and its signup form.
A user created with ``POST /api/users/`` exists but cannot log in, so it cannot hold a session, lock tasks
in ``/next`` or be told apart from the admin in the journal. :func:`sign_up_reviewer` fills in the signup
form as a browser would and returns the new account's API token, so each simulated reviewer works the
queue with a session of its own.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import asdict, dataclass

import httpx
from label_studio_sdk import LabelStudio


class AccountError(RuntimeError):
    """Label Studio did not make or recognise the account (a changed signup form, signup disabled)."""


@dataclass(frozen=True)
class ReviewerAccount:
    email: str
    password: str
    token: str
    user_id: int

    def to_dict(self) -> dict:
        return asdict(self)


def invite_url(sdk: LabelStudio) -> str:
    """The organisation's invite link (``/user/signup/?token=…``), read with the admin's credentials. The
    SDK wraps only *resetting* the link, which would void links already handed out, so the plain ``GET``
    goes through the SDK's authenticated HTTP client."""
    response = sdk._client_wrapper.httpx_client.request("api/invite", method="GET")
    if response.status_code != 200:
        raise AccountError(f"reading the invite link failed: HTTP {response.status_code} {response.text[:200]}")
    return response.json()["invite_url"]


def sign_up_reviewer(sdk: LabelStudio, name: str, password: str | None = None,
                     base_url: str | None = None) -> ReviewerAccount:
    """A new reviewer account, signed up through the invite link's form. ``name`` prefixes a unique email;
    ``base_url`` defaults to the SDK's (the server as the admin reaches it)."""
    base_url = (base_url or sdk._client_wrapper.get_base_url()).rstrip("/")
    password = password or f"Reviewer-{secrets.token_urlsafe(12)}"
    invite = invite_url(sdk)
    email = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
    with httpx.Client(base_url=base_url, follow_redirects=True, timeout=60) as browser:
        browser.get(invite)
        if "csrftoken" not in browser.cookies:
            raise AccountError(f"the signup page {base_url}{invite} set no CSRF cookie")
        browser.post(invite, data={"csrfmiddlewaretoken": browser.cookies["csrftoken"], "email": email,
                                   "password": password}, headers={"Referer": base_url + invite})
        me = browser.get("/api/current-user/whoami")
        if me.status_code != 200 or me.json().get("email") != email:
            raise AccountError(f"signing up {email} did not log it in: HTTP {me.status_code} {me.text[:200]}")
        token = browser.get("/api/current-user/token").json()["token"]
    return ReviewerAccount(email=email, password=password, token=token, user_id=int(me.json()["id"]))


def still_valid(base_url: str, account: ReviewerAccount) -> bool:
    """Whether ``account``'s token still opens a session on this server (a demo's stored accounts belong
    to the Label Studio they were made on)."""
    try:
        me = httpx.get(f"{base_url.rstrip('/')}/api/current-user/whoami",
                       headers={"Authorization": f"Token {account.token}"}, timeout=30)
    except httpx.HTTPError:
        return False
    return me.status_code == 200 and me.json().get("id") == account.user_id
