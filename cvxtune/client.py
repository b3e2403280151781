"""A client for the cvxtune REST API, and the commands built on it: `cvxtune datasets`,
`finetune`, `jobs`, `heads`, `predict` and `backbones` (dispatched by cvxtune.cli).

Only httpx (the `api` extra) and the standard library are imported here, never torch or the web
app, so the commands start quickly on a machine that only talks to a service. numpy is imported
by `predict --embeddings` alone.

Output conventions: a command that creates something prints the new id alone on stdout (so
`DS=$(cvxtune datasets upload data.zip)` works) and a summary on stderr; `--json` prints the
service's JSON on stdout instead. Exit status: 0 success, 1 an error from the service, a failed
or cancelled job or an unreachable service, 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

try:
    import httpx
except ImportError:  # the client needs the `api` extra; the message below says so
    httpx = None  # type: ignore[assignment]

from cvxtune import __version__

URL_ENV = "CVXTUNE_URL"
KEY_ENV = "CVXTUNE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

# Requests stay well under the service's limits (10 000 embeddings, 256 files or 64 MiB each).
EMBEDDING_ROWS_PER_REQUEST = 1000
VALUES_PER_REQUEST = 1_000_000  # numbers per JSON body: about 20 MB, under the 64 MiB cap
IMAGES_PER_REQUEST = 64
IMAGE_BYTES_PER_REQUEST = 32 * 1024**2

NO_KEY = (
    f"error: no API key; pass --key KEY or set {KEY_ENV}. Create one on the server with "
    "`cvxtune keys create --project NAME`"
)
NO_HTTPX = "error: the cvxtune client needs httpx; install it with `pip install 'cvxtune[api]'`"


class ClientError(Exception):
    """An error to show as `error CODE: message`: from the service, or reaching it."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


class UsageError(Exception):
    """The command line asks for something impossible before any request is sent."""


def error_from_response(r: httpx.Response) -> ClientError:
    """A problem+json body as (code, detail); anything else (a proxy's page) as http_STATUS."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        detail = body.get("detail") or body.get("title") or ""
        return ClientError(str(body["code"]), str(detail), r.status_code)
    text = " ".join(r.text.split())[:200] or r.reason_phrase
    return ClientError(f"http_{r.status_code}", text, r.status_code)


class Client:
    """The REST API of one service, as one project (the key's).

    Reads and the idempotent finetune submission are retried on connection faults and on 502,
    503 and 504 answers; uploads and deletions are sent once.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        http: httpx.Client | None = None,
        retries: int = 2,
        backoff: float = 0.5,
    ):
        self.url = url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        self._headers = {
            "Authorization": f"Bearer {key}",
            "User-Agent": f"cvxtune-client/{__version__}",
        }
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0))

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _unreachable(self, exc: Exception) -> ClientError:
        if isinstance(exc, httpx.TimeoutException):
            return ClientError("timeout", f"no answer from {self.url} in time ({exc!r})")
        if isinstance(exc, httpx.ConnectError):
            reason = str(exc) or type(exc).__name__
            return ClientError(
                "connection_failed",
                f"could not connect to {self.url} ({reason}); is the service running there? "
                f"Set --url or {URL_ENV}",
            )
        return ClientError("connection_failed", f"the connection to {self.url} failed ({exc!r})")

    def request(self, method: str, path: str, *, retry: bool = False, **kw: Any) -> httpx.Response:
        """Send one request; raise ClientError for an error answer or an unreachable service."""
        attempts = 1 + (self.retries if retry else 0)
        headers = {**self._headers, **kw.pop("headers", {})}
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                r = self._http.request(method, self.url + path, headers=headers, **kw)
            except httpx.TransportError as e:
                if last:
                    raise self._unreachable(e) from e
            else:
                if r.status_code < 400:
                    return r
                if last or r.status_code not in (502, 503, 504):
                    raise error_from_response(r)
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    @contextmanager
    def stream(self, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """A GET whose body is read as it arrives (event streams, weight files)."""
        headers = {**self._headers, **kw.pop("headers", {})}
        try:
            with self._http.stream("GET", self.url + path, headers=headers, **kw) as r:
                if r.status_code >= 400:
                    r.read()
                    raise error_from_response(r)
                yield r
        except httpx.TransportError as e:
            raise self._unreachable(e) from e

    def get(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=query, retry=True).json()

    # ------------------------------------------------------------------ resources

    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        path = Path(path)
        with path.open("rb") as fh:
            files = {"file": (path.name, fh, _mime(path))}
            data = {"name": name} if name else None
            return self.request("POST", "/v1/datasets", files=files, data=data).json()

    def list_datasets(self, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        return self.get("/v1/datasets", limit=limit, cursor=cursor)

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.get(f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> None:
        self.request("DELETE", f"/v1/datasets/{dataset_id}")

    def backbones(self) -> list[dict[str, Any]]:
        return self.get("/v1/backbones")

    def create_finetune(self, body: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        """Submit a job; retried with the same Idempotency-Key, so a retry never starts two."""
        headers = {"Idempotency-Key": idempotency_key}
        r = self.request("POST", "/v1/finetunes", json=body, headers=headers, retry=True)
        return r.json()

    def list_finetunes(
        self, limit: int = 50, cursor: str | None = None, state: str | None = None
    ) -> dict[str, Any]:
        return self.get("/v1/finetunes", limit=limit, cursor=cursor, state=state)

    def get_finetune(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/v1/finetunes/{job_id}")

    def cancel_finetune(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/finetunes/{job_id}/cancel").json()

    def events(self, job_id: str) -> Generator[dict[str, Any], None, None]:
        """The job's `status` Server-Sent Events, each a job as GET returns it."""
        timeout = httpx.Timeout(10.0, read=60.0)  # the service sends a keep-alive every 15 s
        headers = {"Accept": "text/event-stream"}
        with self.stream(f"/v1/finetunes/{job_id}/events", headers=headers, timeout=timeout) as r:
            event, data = "message", []
            for line in r.iter_lines():
                if line.startswith(":"):
                    continue
                if line:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "event":
                        event = value
                    elif field == "data":
                        data.append(value)
                    continue
                if event == "status" and data:
                    yield json.loads("\n".join(data))
                event, data = "message", []

    def follow(
        self,
        job_id: str,
        on_status: Callable[[dict[str, Any]], None] | None = None,
        *,
        stream: bool = True,
        interval: float = 1.0,
    ) -> dict[str, Any]:
        """Follow a job until it finishes and return it as GET does at the end.

        With `stream`, statuses come from the event stream; a stream that ends early or breaks
        is resumed, and after three such breaks in a row (a proxy that buffers or cuts event
        streams) the job is polled every `interval` seconds instead.
        """
        notify = on_status or (lambda job: None)
        job = self.get_finetune(job_id)
        breaks = 0
        while True:
            notify(job)
            if job["state"] in TERMINAL:
                return job
            if stream and breaks < 3:
                try:
                    with closing(self.events(job_id)) as events:
                        for job in events:
                            breaks = 0
                            if job["state"] in TERMINAL:
                                break
                            notify(job)
                except ClientError as e:
                    if e.status in (404, 405, 406, 501):  # no event stream on this route
                        stream = False
                    elif e.status is not None and e.status not in (502, 504):
                        raise
                    # otherwise the connection broke or a proxy gave up: resume below
                if job["state"] not in TERMINAL:
                    breaks += 1
                    time.sleep(min(interval, 1.0))
            else:
                time.sleep(interval)
            job = self.get_finetune(job_id)

    def list_heads(self, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        return self.get("/v1/heads", limit=limit, cursor=cursor)

    def get_head(self, head_id: str) -> dict[str, Any]:
        return self.get(f"/v1/heads/{head_id}")

    def delete_head(self, head_id: str) -> None:
        self.request("DELETE", f"/v1/heads/{head_id}")

    def download_weights(self, head_id: str, out: str | Path) -> int:
        """Write the head's safetensors to `out` (atomically); returns the number of bytes."""
        out = Path(out)
        part = out.with_name(out.name + ".part")
        size = 0
        try:
            with self.stream(f"/v1/heads/{head_id}/weights") as r, part.open("wb") as fh:
                for chunk in r.iter_bytes():
                    fh.write(chunk)
                    size += len(chunk)
            part.replace(out)
        finally:
            part.unlink(missing_ok=True)
        return size

    def predict_embeddings(self, head_id: str, rows: list[Any]) -> list[dict[str, Any]]:
        """rows: one entry per sample, shaped as the head's input: (d,) for an mlp head,
        (channels, height, width) for cnn, (tokens, d) for attention."""
        preds: list[dict[str, Any]] = []
        per_request = VALUES_PER_REQUEST // _values_per_sample(rows[:1])
        step = max(1, min(EMBEDDING_ROWS_PER_REQUEST, per_request))
        for start in range(0, len(rows), step):
            body = {"embeddings": rows[start : start + step]}
            r = self.request("POST", f"/v1/heads/{head_id}/predict", json=body, retry=True)
            preds += r.json()["predictions"]
        return preds

    def predict_images(self, head_id: str, paths: list[Path]) -> list[dict[str, Any]]:
        preds: list[dict[str, Any]] = []
        for batch in _image_batches(paths):
            files = [("files", (p.name, p.read_bytes(), _mime(p))) for p in batch]
            r = self.request("POST", f"/v1/heads/{head_id}/predict", files=files, retry=True)
            preds += r.json()["predictions"]
        return preds


def _mime(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _image_batches(paths: list[Path]) -> Iterator[list[Path]]:
    batch: list[Path] = []
    size = 0
    for p in paths:
        n = p.stat().st_size
        if batch and (len(batch) == IMAGES_PER_REQUEST or size + n > IMAGE_BYTES_PER_REQUEST):
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += n
    if batch:
        yield batch


# ---------------------------------------------------------------------- output helpers


def _out(text: str = "") -> None:
    print(text, file=sys.stdout)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _print_json(obj: Any) -> None:
    _out(json.dumps(obj, indent=2, ensure_ascii=False))


def _table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _fields(pairs: list[tuple[str, Any]], indent: str = "") -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        _out(f"{indent}{k:<{width}}  {'-' if v is None or v == '' else v}")


def _when(ts: str | None) -> str | None:
    return ts[:19].replace("T", " ") if ts else None


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m}:{s:02d}"


def _num(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _more(page: dict[str, Any]) -> None:
    if page.get("next_cursor"):
        _err(f"(more: --cursor {page['next_cursor']})")


# ---------------------------------------------------------------------- argument parsing


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("service")
    g.add_argument("--url", help=f"the API's address (default: ${URL_ENV}, else {DEFAULT_URL})")
    g.add_argument("--key", help=f"API key (default: ${KEY_ENV})")
    g.add_argument("--json", action="store_true", help="print the service's JSON on stdout")
    return p


def _pages(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--cursor", help="start after this id (printed when there are more)")


def _lam(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"lam must be a positive number or 'auto', not {text!r}")
    return value


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, not {text!r}")
    try:
        value = json.loads(raw)  # numbers, true/false, null
    except ValueError:
        value = raw
    return key.strip(), value


Action = Callable[[Client, argparse.Namespace], int]


def _run(args: argparse.Namespace, action: Action, http: httpx.Client | None) -> int:
    if httpx is None:
        _err(NO_HTTPX)
        return 2
    key = args.key or os.environ.get(KEY_ENV)
    if not key:
        _err(NO_KEY)
        return 2
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    try:
        with Client(url, key, http=http) as client:
            return action(client, args)
    except ClientError as e:
        _err(f"error {e.code}: {e.message}")
        return 1
    except UsageError as e:
        _err(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def _dispatch(p: argparse.ArgumentParser, argv: list[str], http: httpx.Client | None) -> int:
    args = p.parse_args(argv)
    return _run(args, args.action, http)


# ---------------------------------------------------------------------- cvxtune datasets


def _dataset_upload(c: Client, a: argparse.Namespace) -> int:
    path = Path(a.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    ds = c.upload_dataset(path, a.name)
    if a.json:
        _print_json(ds)
        return 0
    _out(ds["id"])
    skipped = len(ds.get("report", {}).get("skipped", []))
    _err(
        f"uploaded {ds['name']}: {ds['n_samples']} samples ({ds['kind']}, {ds['format']}), "
        f"{len(ds['classes'])} classes, {skipped} skipped"
    )
    return 0


def _dataset_list(c: Client, a: argparse.Namespace) -> int:
    page = c.list_datasets(a.limit, a.cursor)
    if a.json:
        _print_json(page)
        return 0
    rows = [
        [d["id"], d["name"], d["kind"], d["n_samples"], len(d["classes"]), _when(d["created_at"])]
        for d in page["data"]
    ]
    _table(rows, ["ID", "NAME", "KIND", "SAMPLES", "CLASSES", "CREATED"])
    _more(page)
    return 0


def _dataset_show(c: Client, a: argparse.Namespace) -> int:
    d = c.get_dataset(a.id)
    if a.json:
        _print_json(d)
        return 0
    counts = ", ".join(f"{k} {n}" for k, n in d["class_counts"].items())
    skipped = d.get("report", {}).get("skipped", [])
    _fields(
        [
            ("id", d["id"]),
            ("name", d["name"]),
            ("kind", f"{d['kind']} ({d['format']})"),
            ("samples", d["n_samples"]),
            ("features", d["n_features"]),
            ("classes", f"{len(d['classes'])}: {counts}"),
            ("skipped", len(skipped)),
            ("size", _size(d["size_bytes"])),
            ("sha256", d["content_hash"]),
            ("created", _when(d["created_at"])),
        ]
    )
    for item in skipped[:10]:
        _out(f"  skipped {item.get('path')}: {item.get('reason')}")
    return 0


def _dataset_delete(c: Client, a: argparse.Namespace) -> int:
    c.delete_dataset(a.id)
    if not a.json:
        _out(f"deleted {a.id}")
    return 0


def datasets_main(argv: list[str], http: httpx.Client | None = None) -> int:
    common = _common()
    p = argparse.ArgumentParser(prog="cvxtune datasets", description="datasets on a service")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser(
        "upload",
        parents=[common],
        help="upload a dataset; prints its id",
        description="Upload a zip/tar ImageFolder, a CSV manifest with its images in a zip/tar, "
        "or an NPZ/Parquet file of features and labels. Prints the new dataset's id.",
    )
    up.add_argument("file")
    up.add_argument("--name", help="a name to show in lists (default: the file's name)")
    up.set_defaults(action=_dataset_upload)
    ls = sub.add_parser("list", parents=[common], help="list datasets, newest first")
    _pages(ls)
    ls.set_defaults(action=_dataset_list)
    for name, action, help_ in (
        ("show", _dataset_show, "a dataset's classes, counts and import report"),
        ("delete", _dataset_delete, "delete a dataset no unfinished job uses"),
    ):
        s = sub.add_parser(name, parents=[common], help=help_)
        s.add_argument("id")
        s.set_defaults(action=action)
    return _dispatch(p, argv, http)


# ---------------------------------------------------------------------- cvxtune finetune / jobs


class _Progress:
    """A job's state, stage, progress and ETA on stderr: rewritten in place on a terminal,
    a line per stage or per 5 points of progress otherwise (logs)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last: tuple[str, str, int] | None = None
        self.width = 0

    def __call__(self, job: dict[str, Any]) -> None:
        pct = int(100 * (job.get("progress") or 0.0))
        key = (job["state"], job["stage"], pct)
        if key == self.last:
            return
        if not self.tty and self.last and key[:2] == self.last[:2] and pct - self.last[2] < 5:
            return
        self.last = key
        eta = "" if job["state"] in TERMINAL else f"  ETA {_eta(job.get('eta_seconds'))}"
        line = f"{job['id']}  {job['state']:<9} {job['stage']:<8} {pct:3d}%{eta}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.width))
            self.width = len(line)
            if job["state"] in TERMINAL:
                sys.stderr.write("\n")
            sys.stderr.flush()
        else:
            _err(line)

    def end(self) -> None:
        if self.tty and self.last and self.last[0] not in TERMINAL:
            sys.stderr.write("\n")


def _finish(job: dict[str, Any], as_json: bool) -> int:
    """Exit status and output for a job that ended."""
    if as_json:
        _print_json(job)
    if job["state"] == "succeeded":
        if not as_json:
            _out(job["head_id"])
        return 0
    if job["state"] == "failed":
        err = job.get("error") or {"code": "failed", "message": "the job failed"}
        _err(f"error {err['code']}: {err['message']}")
    else:
        _err(f"error cancelled: finetune {job['id']} was cancelled")
    return 1


def _finetune(c: Client, a: argparse.Namespace) -> int:
    body: dict[str, Any] = {"dataset_id": a.dataset}
    if a.backbone:
        body["backbone"] = a.backbone
    head = dict(a.option or [])
    if a.head_kind:
        head["kind"] = a.head_kind
    if head:
        body["head"] = head
    for field, value in (
        ("lam", a.lam),
        ("validation_fraction", a.validation_fraction),
        ("seed", a.seed),
    ):
        if value is not None:
            body[field] = value
    job = c.create_finetune(body, a.idempotency_key or f"cli-{uuid.uuid4().hex}")
    if not a.wait:
        if a.json:
            _print_json(job)
        else:
            _out(job["id"])
        return 0
    _err(f"finetune {job['id']} submitted; following it (Ctrl-C stops following, not the job)")
    progress = _Progress()
    try:
        job = c.follow(job["id"], progress, stream=not a.poll, interval=a.poll or 1.0)
    except KeyboardInterrupt:
        progress.end()
        _err(f"stopped following {job['id']}; it goes on (cvxtune jobs cancel {job['id']})")
        return 130
    progress.end()
    return _finish(job, a.json)


def finetune_main(argv: list[str], http: httpx.Client | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cvxtune finetune",
        parents=[_common()],
        description="Fit a convex head on a dataset's embeddings. Prints the job id, or with "
        "--wait follows the job (progress on stderr) and prints the head's id when it succeeds.",
    )
    p.add_argument("--dataset", required=True, help="dataset id")
    p.add_argument(
        "--backbone",
        help="backbone to embed images with (see `cvxtune backbones`); for a features "
        "dataset, the one that produced them, or none",
    )
    p.add_argument("--head-kind", help="head to fit (default: mlp)")
    p.add_argument("--lam", type=_lam, help="regularisation: a positive number or auto (default)")
    p.add_argument("--validation-fraction", type=float, help="held out to validate (default 0.2)")
    p.add_argument("--seed", type=int, help="for the split and the solver's gates (default 0)")
    p.add_argument(
        "--option",
        type=_option,
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="head option, e.g. gates=64 tol=1e-6 max_iter=500 activation=relu",
    )
    p.add_argument(
        "--idempotency-key",
        help="repeat a submission safely: the same key returns the same job (default: a new one)",
    )
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument(
        "--poll",
        type=float,
        metavar="SECONDS",
        help="with --wait, poll this often instead of streaming events",
    )
    p.set_defaults(action=_finetune)
    return _dispatch(p, argv, http)


def _job_fields(j: dict[str, Any]) -> list[tuple[str, Any]]:
    head = dict(j.get("head") or {})
    head_desc = " ".join([str(head.pop("kind", "mlp"))] + [f"{k}={v}" for k, v in head.items()])
    err = j.get("error")
    pct = int(100 * (j.get("progress") or 0.0))
    return [
        ("id", j["id"]),
        ("state", j["state"]),
        ("stage", j["stage"]),
        (
            "progress",
            f"{pct}%" + ("" if j["state"] in TERMINAL else f", ETA {_eta(j['eta_seconds'])}"),
        ),
        ("dataset", j["dataset_id"]),
        ("backbone", j["backbone"]),
        ("head", head_desc),
        ("lam", j["lam"]),
        ("validation", j["validation_fraction"]),
        ("seed", j["seed"]),
        ("head id", j["head_id"]),
        ("error", f"{err['code']}: {err['message']}" if err else None),
        ("created", _when(j["created_at"])),
        ("started", _when(j["started_at"])),
        ("finished", _when(j["finished_at"])),
    ]


def _job_show(c: Client, a: argparse.Namespace) -> int:
    j = c.get_finetune(a.id)
    if a.json:
        _print_json(j)
    else:
        _fields(_job_fields(j))
    return 0


def _job_cancel(c: Client, a: argparse.Namespace) -> int:
    j = c.cancel_finetune(a.id)
    if a.json:
        _print_json(j)
    else:
        _out(f"{j['id']} {j['state']}")
    return 0


def _job_list(c: Client, a: argparse.Namespace) -> int:
    page = c.list_finetunes(a.limit, a.cursor, a.state)
    if a.json:
        _print_json(page)
        return 0
    rows = [
        [
            j["id"],
            j["state"],
            j["stage"],
            f"{int(100 * (j['progress'] or 0.0))}%",
            j["dataset_id"],
            j["head_id"],
            _when(j["created_at"]),
        ]
        for j in page["data"]
    ]
    _table(rows, ["ID", "STATE", "STAGE", "PROGRESS", "DATASET", "HEAD", "CREATED"])
    _more(page)
    return 0


def jobs_main(argv: list[str], http: httpx.Client | None = None) -> int:
    common = _common()
    p = argparse.ArgumentParser(prog="cvxtune jobs", description="finetune jobs on a service")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", parents=[common], help="list jobs, newest first")
    _pages(ls)
    ls.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    ls.set_defaults(action=_job_list)
    for name, action, help_ in (
        ("show", _job_show, "a job's state, stage, progress and error"),
        ("cancel", _job_cancel, "cancel a queued or running job"),
    ):
        s = sub.add_parser(name, parents=[common], help=help_)
        s.add_argument("id")
        s.set_defaults(action=action)
    return _dispatch(p, argv, http)


# ---------------------------------------------------------------------- cvxtune heads


def _val_accuracy(h: dict[str, Any]) -> str | None:
    val = (h.get("metrics") or {}).get("validation")
    return f"{val['accuracy']:.3f}" if val else None


def _head_list(c: Client, a: argparse.Namespace) -> int:
    page = c.list_heads(a.limit, a.cursor)
    if a.json:
        _print_json(page)
        return 0
    rows = [
        [
            h["id"],
            h["backbone"],
            len(h["classes"]),
            _val_accuracy(h),
            _num(h["certificate"].get("duality_gap"), 3),
            _when(h["created_at"]),
        ]
        for h in page["data"]
    ]
    _table(rows, ["ID", "BACKBONE", "CLASSES", "VAL ACC", "GAP", "CREATED"])
    _more(page)
    return 0


def _certificate(cert: dict[str, Any]) -> str:
    gap = _num(cert.get("duality_gap"), 3)
    if cert.get("converged"):
        state = "certified"
    else:
        state = f"not converged after {cert.get('n_iter')} iterations"
    return f"relative duality gap {gap} ({state}); objective {_num(cert.get('objective'))}"


def _head_show(c: Client, a: argparse.Namespace) -> int:
    h = c.get_head(a.id)
    if a.json:
        _print_json(h)
        return 0
    cert, lin, metrics = h["certificate"], h["lineage"], h["metrics"] or {}
    train, val = metrics.get("train"), metrics.get("validation")
    pairs: list[tuple[str, Any]] = [
        ("id", h["id"]),
        ("finetune", h["finetune_id"]),
        ("dataset", h["dataset_id"]),
        ("backbone", h["backbone"]),
        ("kind", h.get("kind", "mlp")),
        ("classes", ", ".join(h["classes"])),
        ("train", train and f"accuracy {train['accuracy']:.3f} (n={train['n']})"),
        ("validation", val and f"accuracy {val['accuracy']:.3f} (n={val['n']})"),
        ("certificate", _certificate(cert)),
        ("neurons", cert.get("n_neurons")),
        ("lam", f"{_num(cert.get('lam'))} (lam_max {_num(cert.get('lam_max'))})"),
        ("created", _when(h["created_at"])),
    ]
    _fields(pairs)
    _out("lineage")
    _fields([(k, v) for k, v in lin.items() if not isinstance(v, dict)], indent="  ")
    if val and val.get("per_class"):
        _out("")
        rows = [
            [name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", m["support"]]
            for name, m in val["per_class"].items()
        ]
        _table(rows, ["VALIDATION", "PRECISION", "RECALL", "SUPPORT"])
    if val and val.get("confusion_matrix"):
        _out("")
        _out("confusion matrix (rows: true class, columns: predicted)")
        _table(
            [[name, *row] for name, row in zip(h["classes"], val["confusion_matrix"], strict=True)],
            ["", *h["classes"]],
        )
    return 0


def _head_weights(c: Client, a: argparse.Namespace) -> int:
    n = c.download_weights(a.id, a.out)
    _err(f"wrote {a.out} ({_size(n)})")
    return 0


def _head_delete(c: Client, a: argparse.Namespace) -> int:
    c.delete_head(a.id)
    if not a.json:
        _out(f"deleted {a.id}")
    return 0


def heads_main(argv: list[str], http: httpx.Client | None = None) -> int:
    common = _common()
    p = argparse.ArgumentParser(prog="cvxtune heads", description="fitted heads on a service")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", parents=[common], help="list heads, newest first")
    _pages(ls)
    ls.set_defaults(action=_head_list)
    for name, action, help_ in (
        ("show", _head_show, "metrics, certificate (duality gap), neurons and lineage"),
        ("delete", _head_delete, "delete a head and its weights"),
    ):
        s = sub.add_parser(name, parents=[common], help=help_)
        s.add_argument("id")
        s.set_defaults(action=action)
    w = sub.add_parser("weights", parents=[common], help="download the weights (safetensors)")
    w.add_argument("id")
    w.add_argument("--out", required=True, help="file to write, e.g. head.safetensors")
    w.set_defaults(action=_head_weights)
    return _dispatch(p, argv, http)


# ---------------------------------------------------------------------- cvxtune predict


def _values_per_sample(rows: list[Any]) -> int:
    """Numbers in the first sample of nested lists (1 at least)."""
    n, x = 1, rows[0] if rows else 0
    while isinstance(x, list) and x:
        n, x = n * len(x), x[0]
    return max(1, n)


def _load_embeddings(path: Path) -> list[Any]:
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a .npy or .npz file ({e})") from e
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = loaded.files
            if "X" not in names and len(names) != 1:
                raise UsageError(f"{path}: expected an array named X, found {names}")
            X = loaded["X" if "X" in names else names[0]]
    else:
        X = loaded
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim not in (2, 3, 4) or X.shape[0] == 0:
        raise UsageError(
            f"{path}: expected (n_samples, n_features), (n_samples, tokens, d) or "
            f"(n_samples, channels, height, width), got {X.shape}"
        )
    return X.tolist()


def _predict(c: Client, a: argparse.Namespace) -> int:
    if bool(a.files) == bool(a.embeddings):
        raise UsageError("give image files or --embeddings FILE.npy (one of them)")
    if a.embeddings:
        rows = _load_embeddings(Path(a.embeddings))
        preds = c.predict_embeddings(a.head_id, rows)
        names = [f"row {i}" for i in range(len(rows))]
    else:
        paths = [Path(f) for f in a.files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UsageError(f"no such file: {', '.join(missing)}")
        preds = c.predict_images(a.head_id, paths)
        names = list(a.files)
    if a.json:
        _print_json({"head_id": a.head_id, "predictions": preds})
        return 0
    rows_out = []
    for name, pred in zip(names, preds, strict=True):
        ranked = sorted(pred["probabilities"].items(), key=lambda kv: -kv[1])
        runner = f"{ranked[1][0]} {ranked[1][1]:.3f}" if len(ranked) > 1 else None
        rows_out.append(
            [name, pred["label"], f"{pred['probabilities'][pred['label']]:.3f}", runner]
        )
    _table(rows_out, ["INPUT", "LABEL", "PROBABILITY", "NEXT"])
    return 0


def predict_main(argv: list[str], http: httpx.Client | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cvxtune predict",
        parents=[_common()],
        description="Predict images (sent as multipart field 'files') or embeddings with a head.",
    )
    p.add_argument("head_id")
    p.add_argument("files", nargs="*", metavar="FILE", help="images (png, jpeg, ...)")
    p.add_argument(
        "--embeddings",
        metavar="FILE.npy",
        help="a .npy (or an .npz holding X) of the head's inputs instead of images: "
        "(n, features) for mlp, (n, channels, height, width) for cnn, (n, tokens, d) for "
        "attention heads",
    )
    p.set_defaults(action=_predict)
    return _dispatch(p, argv, http)


# ---------------------------------------------------------------------- cvxtune backbones


def _backbones(c: Client, a: argparse.Namespace) -> int:
    entries = c.backbones()
    if a.json:
        _print_json(entries)
        return 0
    rows = [
        [
            b["name"],
            b["embed_dim"],
            "x".join(str(s) for s in b["input_size"]),
            "yes" if b["weights_available"] else "no",
            b.get("description", ""),
        ]
        for b in entries
    ]
    _table(rows, ["NAME", "DIM", "INPUT", "WEIGHTS", "DESCRIPTION"])
    return 0


def backbones_main(argv: list[str], http: httpx.Client | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cvxtune backbones",
        parents=[_common()],
        description="The service's backbones, and whether their weights are available there.",
    )
    p.set_defaults(action=_backbones)
    return _dispatch(p, argv, http)
