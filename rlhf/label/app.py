"""The labeling web app: an ASGI app (Starlette) with server-rendered pages and one static script.

    app = create_app("feedback.sqlite")          # a project made by `rlhf label serve`
    uvicorn.run(app, host="127.0.0.1", port=8000)

Pages: /login (the only one open without a session), /label (the next item of the signed-in
labeler), /answers (their own answers), /admin and /admin/items/N (admins only). Forms post to
/items/N/answer and /answers/N/undo and are answered with a redirect, so the app works without
JavaScript; /static/label.js adds the keyboard shortcuts.

Untrusted text (prompts, completions, reasons, names) goes through Jinja's autoescaping, or for
prompts and completions through `markdown.render`, which escapes every character and adds only
fixed tags without attributes; no template marks data safe, and the Content-Security-Policy
allows scripts from /static alone.
Every state-changing request needs the session's CSRF token and, when the browser sends one, an
Origin of this server.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import time
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from rlhf.data import Content, DataError, as_text
from rlhf.label import agreement, ai_agreement, export, markdown, quality
from rlhf.label.quality import display_order
from rlhf.label.db import Answer, Item, Labeler, LateAnswer, Project, Session, Store, StoreError

HERE = Path(__file__).parent
COOKIE = "rlhf_label_session"
MAX_BODY = 64 * 1024
MAX_REASON = 2000
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")
STATUS = {"not_found": 404, "conflict": 409, "invalid": 422}
BAD_INVITE = "This sign-in link is not valid or was already used: ask your project admin for a new one."
EXPIRED_INVITE = "This sign-in link has expired: ask your project admin for a new one."
COOKIE_SECONDS = 400 * 24 * 3600
"""The cookie outlives the session (Chromium's cap): the server decides when a session ends."""
ASCII_NUMBER = re.compile(r"[0-9]{1,18}")
"""A whole number in a form: ASCII digits only (str.isdigit also takes "²", which int() refuses,
and "١", which it reads as 1), and few enough of them to fit SQLite's 64-bit integers."""


class IdConvertor(Convertor):
    """Row ids in paths: at most 18 ASCII digits, so a larger one is a 404 rather than an
    OverflowError from SQLite."""

    regex = "[0-9]{1,18}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id", IdConvertor())

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    # The invite token is in the login URL: no Referer to other sites. ("no-referrer" would also
    # make chromium send "Origin: null" on our own form posts, which the Origin check refuses.)
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """ASGI middleware: security headers on every response, no caching of pages, and a cap on
    request bodies (413) so a client cannot make the server buffer an unbounded form."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_static = scope["path"].startswith(scope.get("root_path", "") + "/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if not is_static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            response = JSONResponse({"error": f"request body over {MAX_BODY} bytes"}, status_code=413)
            return await response(scope, receive, send_with_headers)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY:
                raise HTTPException(413, f"request body over {MAX_BODY} bytes")
            return message

        await self.app(scope, limited_receive, send_with_headers)


class TrustedProxy:
    """ASGI middleware: a request from a reverse proxy on one of `hosts` takes the scheme, host
    and client address the proxy saw from its X-Forwarded-Proto, -Host and -For headers, so that
    the Origin check and the Secure cookie see what the browser sees when the proxy terminates
    TLS, rewrites Host or runs on another machine. From any other peer these headers are ignored:
    a client cannot claim another origin."""

    def __init__(self, app, hosts: frozenset[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        if scope["type"] == "http" and client and client[0] in self.hosts:
            headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
            scope = dict(scope)
            proto = headers.get(b"x-forwarded-proto", "").split(",")[0].strip()
            if proto in ("http", "https"):
                scope["scheme"] = proto
            host = headers.get(b"x-forwarded-host", "").split(",")[0].strip()
            if host:
                scope["headers"] = [(n, v) for n, v in scope["headers"] if n != b"host"] + [(b"host", host.encode())]
            forwarded_for = headers.get(b"x-forwarded-for", "").split(",")[-1].strip()
            if forwarded_for:  # the address the proxy itself appended: earlier ones are the client's word
                scope["client"] = (forwarded_for, 0)
        await self.app(scope, receive, send)


# ---------------------------------------------------------------- presentation helpers


def describe(project: Project, value: object, names: dict[int, str]) -> str:
    """An answer in words; `names` gives each completion index its name on the page (A, B, #1...)."""
    if value is None:
        return "skipped"
    if project.task == "pair":
        return "tie" if value == "tie" else f"{names[value]} better"
    if project.task == "rank":
        return " > ".join(names[c] for c in value)
    if project.scale == "thumbs":
        return "thumbs up" if value == 1 else "thumbs down"
    return f"{value} / 7"


def labeler_names(project: Project, item: Item, labeler_id: int) -> dict[int, str]:
    order = display_order(item.id, labeler_id, len(item.completions))
    if project.task == "pair":
        return {completion: "AB"[shown] for shown, completion in enumerate(order)}
    return {completion: str(shown + 1) for shown, completion in enumerate(order)}


def admin_names(item: Item) -> dict[int, str]:
    return {c: f"#{c + 1}" for c in range(len(item.completions))}


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))


def fraction(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


def excerpt(text: Content, size: int = 120) -> str:
    """One line of a prompt or completion for a table; a conversation as its "role: content" text."""
    text = " ".join(as_text(text).split())
    return text if len(text) <= size else text[: size - 1] + "…"


# ---------------------------------------------------------------- parsing answers


def parse_value(project: Project, item: Item, labeler_id: int, form: FormData) -> object:
    """The canonical answer from a posted form, or a 422 that says what is expected."""
    choice = form.get("choice", "")
    if choice == "skip":
        return None
    order = display_order(item.id, labeler_id, len(item.completions))
    if project.task == "pair":
        if choice == "a":
            return order[0]
        if choice == "b":
            return order[1]
        if choice == "tie":
            return "tie"
        raise HTTPException(422, f"choice must be one of a, b, tie, skip; got {choice!r}")
    if project.task == "rank":
        if choice not in ("", "rank"):
            raise HTTPException(422, f"choice must be rank or skip; got {choice!r}")
        k = len(item.completions)
        ranks = []
        for shown in range(k):
            raw = form.get(f"rank_{shown}", "")
            if not ASCII_NUMBER.fullmatch(raw) or not 1 <= int(raw) <= k:
                raise HTTPException(422, f"rank_{shown} must be a whole number from 1 to {k}; got {raw!r}")
            ranks.append(int(raw))
        if sorted(ranks) != list(range(1, k + 1)):
            raise HTTPException(422, f"give each of the {k} completions a different rank from 1 to {k}")
        return [order[shown] for shown in sorted(range(k), key=lambda s: ranks[s])]
    if project.scale == "thumbs":
        if choice in ("up", "down"):
            return 1 if choice == "up" else 0
        raise HTTPException(422, f"choice must be one of up, down, skip; got {choice!r}")
    if choice in {str(n) for n in range(1, 8)}:
        return int(choice)
    raise HTTPException(422, f"choice must be a whole number from 1 to 7 or skip; got {choice!r}")


# ---------------------------------------------------------------- the app


def create_app(db_path: str | Path, trusted_proxies: frozenset[str] = frozenset()) -> SecurityHeaders:
    """The app on one project file; `trusted_proxies`: addresses of reverse proxies whose
    X-Forwarded-* headers are believed (see `TrustedProxy`)."""
    store = Store(db_path)
    project = store.project()
    if project is None:
        raise StoreError("not_found", f"{db_path} holds no project yet: run `rlhf label serve --candidates ...` once")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.globals.update(when=when, fraction=fraction, percent=percent, excerpt=excerpt, project=project,
                       seconds=seconds, flag_accuracy=quality.FLAG_ACCURACY, min_gold=quality.MIN_GOLD)
    env.filters["markdown"] = markdown.render
    env.globals["guidelines"] = store.setting("guidelines", "")
    gold_rate = float(store.setting("gold_rate", "0"))

    def render(request: Request, name: str, code: int = 200, **context) -> HTMLResponse:
        context.setdefault("session", None)
        context["root"] = request.scope.get("root_path", "")
        return HTMLResponse(env.get_template(name).render(**context), status_code=code)

    def redirect(request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(request.scope.get("root_path", "") + path, status_code=303)

    # ------------------------------------------------------------ sessions and CSRF

    async def session_of(request: Request, admin: bool = False) -> Session:
        token = request.cookies.get(COOKIE)
        session = await run_in_threadpool(store.session, token) if token else None
        if session is None:
            raise HTTPException(401, "Sign in first: open the sign-in link you were given (your project admin can send a new one).")
        if admin and not session.labeler.is_admin:
            raise HTTPException(403, "This page is for project admins.")
        return session

    def check_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise HTTPException(403, "This request came from another site.")

    async def read_form(request: Request) -> FormData:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            raise HTTPException(415, "Send the form as application/x-www-form-urlencoded.")
        return await request.form(max_files=0, max_fields=64)

    async def checked_post(request: Request, admin: bool = False) -> tuple[Session, FormData]:
        """The session and form of a state-changing request, with its CSRF token checked."""
        session = await session_of(request, admin)
        check_origin(request)
        form = await read_form(request)
        token = form.get("csrf") or request.headers.get("x-csrf-token") or ""
        if not hmac.compare_digest(str(token).encode(), session.csrf.encode()):
            raise HTTPException(403, "The form's security token is missing or wrong: reload the page and try again.")
        return session, form

    # ------------------------------------------------------------ sign in and out

    def start_page(labeler: Labeler) -> str:
        # An admin lands on the overview: opening the queue would hand them an item.
        return "/admin" if labeler.is_admin else "/label"

    async def login_page(request: Request) -> Response:
        token = request.query_params.get("token", "")
        cookie = request.cookies.get(COOKIE)
        session = await run_in_threadpool(store.session, cookie) if cookie else None
        if session is not None:  # already signed in: a used link (or any) opens the work
            return redirect(request, start_page(session.labeler))
        labeler, expired = await run_in_threadpool(store.invited, token) if token else (None, False)
        if token and (labeler is None or expired):
            return render(request, "login.html", 403, token="", invitee=None, error=EXPIRED_INVITE if expired else BAD_INVITE)
        return render(request, "login.html", token=token, invitee=labeler, error=None)

    async def login(request: Request) -> Response:
        check_origin(request)
        form = await read_form(request)
        token = str(form.get("token", "")).strip()
        opened = await run_in_threadpool(store.redeem_invite, token) if token else None
        if opened is None:
            _, expired = await run_in_threadpool(store.invited, token) if token else (None, False)
            return render(request, "login.html", 403, token="", invitee=None, error=EXPIRED_INVITE if expired else BAD_INVITE)
        session_token, labeler = opened
        response = redirect(request, start_page(labeler))
        # Lax: a link from another site (a chat message, an email) opens the queue signed in.
        # Cross-site posts still fail the Origin and CSRF-token checks.
        response.set_cookie(
            COOKIE, session_token, max_age=COOKIE_SECONDS, path=request.scope.get("root_path", "") or "/",
            httponly=True, samesite="lax", secure=request.url.scheme == "https",
        )
        return response

    async def logout(request: Request) -> Response:
        await checked_post(request)
        await run_in_threadpool(store.end_session, request.cookies[COOKIE])
        response = redirect(request, "/login")
        response.delete_cookie(COOKIE, path=request.scope.get("root_path", "") or "/")
        return response

    # ------------------------------------------------------------ labeling

    async def home(request: Request) -> Response:
        await session_of(request)
        return redirect(request, "/label")

    def page_state(labeler_id: int) -> tuple[Item | None, dict, Answer | None]:
        item = store.next_item(labeler_id, project.overlap, gold_rate)
        return item, store.progress(labeler_id, project.overlap), store.last_answer(labeler_id)

    async def label_page(request: Request) -> Response:
        session = await session_of(request)
        labeler = session.labeler
        item, progress, last = await run_in_threadpool(page_state, labeler.id)
        context = dict(
            session=session, progress=progress, last=last,
            notice={"saved": "Answer saved.", "undone": "Answer undone: here it is again.",
             "late": "That item got all its answers from others while it waited, so yours was not needed: here is the next one."}.get(
                request.query_params.get("done", "")
            ),
        )
        if item is None:
            return render(request, "done.html", **context)
        order = display_order(item.id, labeler.id, len(item.completions))
        shown = [(position, completion, item.completions[completion]) for position, completion in enumerate(order)]
        return render(request, f"{project.task}.html", item=item, shown=shown, key=secrets.token_urlsafe(16), **context)

    async def answer(request: Request) -> Response:
        session, form = await checked_post(request)
        item_id = request.path_params["item_id"]
        key = str(form.get("key", ""))
        if not KEY_PATTERN.fullmatch(key):
            raise HTTPException(422, "key (the idempotency key) must be 8 to 64 letters, digits, - or _.")
        reason = str(form.get("reason", "")).strip()
        if len(reason) > MAX_REASON:
            raise HTTPException(422, f"reason must be at most {MAX_REASON} characters; got {len(reason)}.")
        item = await run_in_threadpool(store.item, item_id)
        if item is None:
            raise HTTPException(404, f"item {item_id} is not in your queue")
        value = parse_value(project, item, session.labeler.id, form)
        try:
            await run_in_threadpool(store.submit, session.labeler.id, item_id, value, reason, key, project.overlap)
        except LateAnswer:
            return redirect(request, "/label?done=late")
        return redirect(request, "/label?done=saved")

    async def undo(request: Request) -> Response:
        session, _ = await checked_post(request)
        await run_in_threadpool(store.undo, session.labeler.id, request.path_params["answer_id"])
        return redirect(request, "/label?done=undone")

    async def my_answers(request: Request) -> Response:
        session = await session_of(request)
        rows = await run_in_threadpool(store.answers_of, session.labeler.id)
        answers = [
            (a, item, describe(project, a.value, labeler_names(project, item, session.labeler.id))) for a, item in rows
        ]
        return render(request, "answers.html", session=session, answers=answers)

    # ------------------------------------------------------------ admin

    def admin_state() -> dict:
        overview = store.overview(project.overlap)
        answers, all_items = store.live_answers(), store.items()
        names = [row["name"] for row in overview["labelers"]]
        stats = quality.labeler_stats(project, all_items, answers, store.answer_seconds(), names)
        for row in overview["labelers"]:
            row.update(stats[row["name"]])
        # Agreement is measured on the project's own items; gold items have their known answer.
        live = [a for a in answers if a.value is not None and all_items[a.item_id].gold is None]
        by_item: dict[int, dict[str, object]] = {}
        for a in live:
            by_item.setdefault(a.item_id, {})[a.labeler] = tuple(a.value) if isinstance(a.value, list) else a.value
        summary = agreement.summarize(project.task, project.scale, by_item)
        shown = summary["disagreements"][:50]
        for d in shown:
            item = all_items[d["item"]]
            names = admin_names(item)
            d["prompt"] = item.prompt
            d["answers"] = {
                name: describe(project, list(v) if isinstance(v, tuple) else v, names)
                for name, v in sorted(d["answers"].items())
            }
        reward_eval, reward_rows, reward_error = store.setting("reward_eval", ""), [], None
        if reward_eval:
            try:
                reward_rows = quality.read_reward_eval(reward_eval)
            except StoreError as exc:  # retrained or moved since the server started: say so, show the rest
                reward_error = str(exc)
        ai_labels, ai_reports, ai_error = store.setting("ai_labels", ""), [], None
        if ai_labels:
            try:
                ai_reports = ai_agreement.compare(ai_agreement.read_labels(ai_labels, ai=True), human_judgements(), project.scale)
            except (DataError, OSError) as exc:  # rewritten or moved since the server started: say so, show the rest
                ai_error = str(exc)
        return {"overview": overview, "summary": summary, "disagreements": shown,
                "has_gold": any(item.gold is not None for item in all_items.values()),
                "reward_eval": reward_eval, "reward_rows": reward_rows, "reward_error": reward_error,
                "ai_labels": ai_labels, "ai_reports": ai_reports, "ai_error": ai_error}

    def human_judgements() -> list[ai_agreement.Judgement]:
        """The answers as `rlhf label export` writes them (no skips, ties or gold items), so that
        the page shows what `rlhf judge-agreement` prints for the exported file."""
        records, _ = export.records(store)
        return [ai_agreement.judgement(r, f"{store.path}: answer {i + 1}", ai=False) for i, r in enumerate(records)]

    async def admin_page(request: Request, session: Session | None = None, link: tuple[str, str] | None = None,
                         notice: str | None = None) -> Response:
        session = session or await session_of(request, admin=True)
        state = await run_in_threadpool(admin_state)
        return render(request, "admin.html", session=session, link=link, notice=notice, **state)

    def labeler_named(form: FormData) -> str:
        name = str(form.get("name", "")).strip()
        if not name or len(name) > 64:
            raise HTTPException(422, "name must be a labeler's name, 1 to 64 characters")
        return name

    async def send_link(request: Request) -> Response:
        """A new sign-in link for a labeler (new, signed out, on a new device, or revoked)."""
        session, form = await checked_post(request, admin=True)
        name = labeler_named(form)
        token, _ = await run_in_threadpool(store.add_labeler, name, form.get("admin") == "1")
        return await admin_page(request, session, link=(name, f"{request.base_url}login?token={token}"))

    async def revoke(request: Request) -> Response:
        session, form = await checked_post(request, admin=True)
        name = labeler_named(form)
        if name == session.labeler.name:
            raise HTTPException(409, "you cannot revoke your own access; ask another admin or use the CLI")
        ended = await run_in_threadpool(store.revoke, name)
        return await admin_page(request, session, notice=f"Revoked {name}: {ended} session{'s' if ended != 1 else ''} ended.")

    async def admin_item(request: Request) -> Response:
        session = await session_of(request, admin=True)
        item_id = request.path_params["item_id"]
        item = await run_in_threadpool(store.item, item_id)
        if item is None:
            raise HTTPException(404, f"there is no item {item_id}")
        answers = await run_in_threadpool(store.live_answers, item_id)
        names = admin_names(item)
        # A reason speaks of what its labeler saw ("A is concise"): say which completion that was.
        rows = [
            (a, describe(project, a.value, names),
             " · ".join(f"{seen} = {names[c]}" for c, seen in sorted(labeler_names(project, item, a.labeler_id).items(),
                                                                    key=lambda kv: kv[1])))
            for a in answers
        ]
        return render(request, "admin_item.html", session=session, item=item, answers=rows)

    # ------------------------------------------------------------ errors

    def wants_html(request: Request) -> bool:
        return "text/html" in request.headers.get("accept", "")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if wants_html(request):
            return render(request, "error.html", exc.status_code, status=exc.status_code, message=exc.detail)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    async def store_error(request: Request, exc: StoreError) -> Response:
        return await http_error(request, HTTPException(STATUS[exc.kind], str(exc)))

    routes = [
        Route("/", home),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/label", label_page, methods=["GET"]),
        Route("/items/{item_id:id}/answer", answer, methods=["POST"]),
        Route("/answers", my_answers, methods=["GET"]),
        Route("/answers/{answer_id:id}/undo", undo, methods=["POST"]),
        Route("/admin", admin_page, methods=["GET"]),
        Route("/admin/items/{item_id:id}", admin_item, methods=["GET"]),
        Route("/admin/labelers/link", send_link, methods=["POST"]),
        Route("/admin/labelers/revoke", revoke, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, StoreError: store_error})
    app.state.store = store
    return SecurityHeaders(TrustedProxy(app, frozenset(trusted_proxies)))


def app_from_environment() -> SecurityHeaders:
    """The app factory `rlhf label serve` hands to uvicorn (an import string, as its worker
    processes need): the project file and proxies come in RLHF_LABEL_DB and
    RLHF_LABEL_TRUSTED_PROXIES (comma-separated)."""
    proxies = os.environ.get("RLHF_LABEL_TRUSTED_PROXIES", "")
    return create_app(os.environ["RLHF_LABEL_DB"], frozenset(p.strip() for p in proxies.split(",") if p.strip()))
