"""`rlhf label ...`: serve the labeling app, invite labelers, export their answers.

    python -m rlhf.label serve --candidates candidates.jsonl --db feedback.sqlite --task pair --overlap 2
    python -m rlhf.label add-labeler alice --db feedback.sqlite [--admin]   # or a new sign-in link
    python -m rlhf.label revoke alice --db feedback.sqlite
    python -m rlhf.label export --db feedback.sqlite --out prefs.jsonl

The main CLI mounts these with `add_label_parser(subparsers)` and, for `rlhf label ...`, calls
`run(args)`, which returns the exit status and prints errors without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlhf.data import LOCAL_SUFFIXES, Comparison, DataError, Rating, load_candidates, load_feedback
from rlhf.label.db import SCALES, TASKS, Project, Store, StoreError, build_items
from rlhf.label.ai_agreement import read_labels
from rlhf.label.quality import read_reward_eval
from rlhf.label.export import export

MAX_GUIDELINES = 100_000


def read_candidates(path: Path) -> list:
    """The records of a local candidates file (`rlhf generate` writes JSONL); never a hub name."""
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(str(path), f"a candidates file ends in one of {', '.join(LOCAL_SUFFIXES)}")
    return list(load_candidates(path))


def read_guidelines(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError("invalid", f"cannot read the guidelines {path}: {exc}") from None
    if len(text) > MAX_GUIDELINES:
        raise StoreError("invalid", f"the guidelines {path} are over {MAX_GUIDELINES} characters")
    return text


def read_gold(path: Path, project: Project) -> list[tuple[tuple, object]]:
    """Quality-control items from a feedback file (as `export` writes, the right answers known):
    ((prompt, completions, source), right answer) each; pairs and rankings best first."""
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(str(path), f"a gold file ends in one of {', '.join(LOCAL_SUFFIXES)}")
    gold = []
    for record in load_feedback(path):
        if isinstance(record, Rating) and project.task == "rate":
            if record.label not in ((0, 1) if project.scale == "thumbs" else range(1, 8)):
                raise DataError(record.source, f"label must be on the project's {project.scale} scale, got {record.label}")
            gold.append(((record.prompt, [record.completion], record.source), int(record.label)))
        elif isinstance(record, Comparison) and project.task in ("pair", "rank") and (
            (len(record.completions) == 2) == (project.task == "pair")
        ):
            best = 0 if project.task == "pair" else list(range(len(record.completions)))
            gold.append(((record.prompt, list(record.completions), record.source), best))
        else:
            raise DataError(record.source, f"not a {project.task} record, as a {project.task} project's gold needs")
        if not all(isinstance(c, str) for c in gold[-1][0][1]):
            raise DataError(record.source, "gold completions must be plain text")
    return gold


def serve(args: argparse.Namespace) -> int:
    # Everything is checked before the project file is opened, so that a failed first run
    # leaves no empty database behind.
    root = args.root_path.rstrip("/")
    if root and not root.startswith("/"):
        raise StoreError("invalid", f"--root-path must start with /, got {args.root_path!r}")
    if args.workers < 1:
        raise StoreError("invalid", f"--workers must be at least 1, got {args.workers}")
    records = read_candidates(args.candidates) if args.candidates else []
    stored = Store(args.db).project() if args.db.exists() else None
    if stored is None and not args.candidates:
        raise StoreError("invalid", f"{args.db} holds no project yet: pass --candidates FILE to start one")
    # A new project takes the flags (or their defaults); an existing one keeps its settings,
    # and a flag that contradicts them is an error.
    project = Project(
        args.task or (stored.task if stored else "pair"),
        args.overlap if args.overlap is not None else (stored.overlap if stored else 1),
        args.scale or (stored.scale if stored else "thumbs"),
    )
    items, dropped = build_items(records, project.task)
    if stored is None and not items:
        raise StoreError("invalid", f"{args.candidates} gives no {project.task} items")
    guidelines = read_guidelines(args.guidelines) if args.guidelines else None
    gold = read_gold(args.gold, project) if args.gold else []
    if args.gold_rate is not None and not 0 <= args.gold_rate < 1:
        raise StoreError("invalid", f"--gold-rate must be at least 0 and below 1, got {args.gold_rate}")
    if args.reward_eval is not None:
        read_reward_eval(args.reward_eval)
    if args.ai_labels is not None:
        ai_labels = read_labels(args.ai_labels, ai=True)
    store = Store(args.db)
    store.set_project(project)
    if guidelines is not None:
        store.set_setting("guidelines", guidelines)
    if gold:
        added = store.add_items([item for item, _ in gold], [answer for _, answer in gold])
        print(f"{args.gold}: {added} new quality-control items", file=sys.stderr)
    if args.gold_rate is not None:
        store.set_setting("gold_rate", str(args.gold_rate))
    if args.reward_eval is not None:
        store.set_setting("reward_eval", str(args.reward_eval.resolve()))
    if args.ai_labels is not None:
        store.set_setting("ai_labels", str(args.ai_labels.resolve()))
        print(f"{args.ai_labels}: {len(ai_labels)} AI labels; the admin page compares them with the human answers", file=sys.stderr)
    if args.candidates:
        added = store.add_items(items)
        print(f"{args.candidates}: {added} new items ({len(items) - added} already in {args.db})", file=sys.stderr)
        if dropped:
            print(f"  left out {dropped} empty or repeated completions", file=sys.stderr)
    count = len(store.items())
    store.close()

    import uvicorn

    local = f"http://{args.host}:{args.port}{root}"
    public = local if args.host in ("127.0.0.1", "localhost") else f"https://YOUR-HOST{root}"
    print(
        f"Serving {count} {project.task} items (each to {project.overlap} labelers) at {local}"
        f" with {args.workers} worker{'s' if args.workers != 1 else ''}\n"
        f"Invite labelers with: python -m rlhf.label add-labeler NAME --db {args.db} --base-url {public}",
        file=sys.stderr,
    )
    # An import string and the settings in the environment: what uvicorn's worker processes need.
    os.environ["RLHF_LABEL_DB"] = str(args.db)
    os.environ["RLHF_LABEL_TRUSTED_PROXIES"] = ",".join(args.trusted_proxy)
    uvicorn.run(
        "rlhf.label.app:app_from_environment", factory=True, host=args.host, port=args.port, workers=args.workers,
        root_path=root, proxy_headers=False, log_level="warning", access_log=False,
    )
    return 0


def add_labeler(args: argparse.Namespace) -> int:
    name = args.name.strip()
    if not name or len(name) > 64:
        raise StoreError("invalid", "a labeler name must be 1 to 64 characters")
    token, created = Store(args.db).add_labeler(name, is_admin=args.admin)
    what = "new labeler" if created else "new sign-in link for existing labeler (any earlier unused link stops working)"
    print(f"{what} {name}{' (admin)' if args.admin else ''}; the link works once, within 7 days:", file=sys.stderr)
    print(f"{args.base_url.rstrip('/')}/login?token={token}")
    return 0


def revoke(args: argparse.Namespace) -> int:
    ended = Store(args.db).revoke(args.name)
    print(f"revoked {args.name}: {ended} session{'s' if ended != 1 else ''} ended; add-labeler gives them a new link",
          file=sys.stderr)
    return 0


def export_command(args: argparse.Namespace) -> int:
    if args.min_gold_accuracy is not None and not 0 <= args.min_gold_accuracy <= 1:
        raise StoreError("invalid", f"--min-gold-accuracy must be from 0 to 1, got {args.min_gold_accuracy}")
    counts = export(Store(args.db), args.out, args.min_gold_accuracy)
    kept = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind in ("pairs", "rankings", "ratings") and n)
    left = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind not in ("pairs", "rankings", "ratings") and n)
    print(f"wrote {kept or 'no records'} to {args.out}" + (f"; left out {left}" if left else ""), file=sys.stderr)
    return 0


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    commands = parser.add_subparsers(dest="label_command", required=True, metavar="COMMAND")

    p = commands.add_parser("serve", help="serve the labeling app (the first run creates the project)")
    p.add_argument("--candidates", type=Path, help="candidates file to add items from (as `rlhf generate` writes)")
    p.add_argument("--db", type=Path, default=Path("feedback.sqlite"), help="the project's SQLite file")
    p.add_argument("--task", choices=TASKS, help="new project: pair (A/B/tie/skip, the default), rank K, or rate one")
    p.add_argument("--overlap", type=int, help="new project: how many different labelers answer each item (1)")
    p.add_argument("--scale", choices=SCALES, help="new rate project: thumbs (the default) or 1-7")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--guidelines", type=Path,
                   help="a Markdown file of instructions for labelers, shown on every item (replaces earlier ones)")
    p.add_argument("--gold", type=Path, help="quality-control items with known answers, as feedback records")
    p.add_argument("--gold-rate", type=float, help="the share of each labeler's items that are quality-control ones")
    p.add_argument("--reward-eval", type=Path,
                   help="a personal reward model's eval.json (`rlhf reward` with reward.personal.enabled): the admin page shows, per labeler, its accuracy on their labels, pooled against their own")
    p.add_argument("--ai-labels", type=Path,
                   help="AI labels (what `rlhf judge` writes): the admin page shows their agreement with the human answers, overall and per principle")
    p.add_argument("--workers", type=int, default=1, help="server processes (they share the SQLite file)")
    p.add_argument("--root-path", default="", help="the path the app is served under behind a proxy, e.g. /label")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                   help="a reverse proxy whose X-Forwarded-Proto/-Host/-For headers are believed (repeatable)")
    p.set_defaults(func=serve)

    p = commands.add_parser("add-labeler", help="add a labeler, or give one a new sign-in link, and print it")
    p.add_argument("name")
    p.add_argument("--db", type=Path, default=Path("feedback.sqlite"))
    p.add_argument("--admin", action="store_true", help="may open the admin page")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="where labelers reach the server")
    p.set_defaults(func=add_labeler)

    p = commands.add_parser("revoke", help="end a labeler's access: every session and any unused sign-in link")
    p.add_argument("name")
    p.add_argument("--db", type=Path, default=Path("feedback.sqlite"))
    p.set_defaults(func=revoke)

    p = commands.add_parser("export", help="write the answers as feedback records that `rlhf reward` reads")
    p.add_argument("--db", type=Path, default=Path("feedback.sqlite"))
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--min-gold-accuracy", type=float,
                   help="leave out the answers of labelers below this accuracy on gold items (0 to 1)")
    p.set_defaults(func=export_command)
    return parser


def add_label_parser(subparsers) -> argparse.ArgumentParser:
    """Mount `label` on the main CLI's subparsers."""
    return build_parser(subparsers.add_parser("label", help="human feedback web app", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argparse.ArgumentParser(prog="python -m rlhf.label", description=__doc__,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (DataError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
