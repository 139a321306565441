"""Models and tokenizers from the Hugging Face hub, through `huggingface_hub`.

One listing of the repository comes first (one request, no retries, a bounded timeout). It
tells the three failures a user must tell apart: the hub cannot be reached (network, DNS,
proxy: reported at once, naming the host and the cause, never after minutes of retries), the
model does not exist there (or is private), and the revision does not. The listing also says
which files to fetch, so nothing is asked for that the repository lacks. With HF_HUB_OFFLINE=1,
or when the hub cannot be reached but the model is in the local cache, the cached snapshot is
used as it is. huggingface_hub's own log lines are silenced while we fetch: it would print each
retry twice (its handler and ours), and every failure is reported by us, once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

from mergesmith.errors import MergeError
from mergesmith.sources.files import (
    LOOKED_FOR,
    TOKENIZER_FILES,
    WeightsChoice,
    choose_weights,
    is_index_name,
)

log = logging.getLogger("mergesmith")

# Small files worth fetching from a hub repository beside the weights.
SIDE_FILES = ("config.json", *TOKENIZER_FILES)
_COMMIT = re.compile(r"[0-9a-f]{40}")
# Exception classes of the HTTP stacks huggingface_hub has used (httpx, httpx2, requests,
# urllib3) that mean "no answer from the server", as opposed to an answer saying no.
_TRANSPORT_NAMES = {
    "TransportError",
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "TimeoutException",
    "NewConnectionError",
    "MaxRetryError",
    "ProxyError",
    "SSLError",
}
_HTTP_MODULES = ("httpx", "httpx2", "requests", "urllib3")


def fetch_model(ref: str, repo_id: str, revision: str | None) -> Path:
    """The local folder (a snapshot in the hub cache) holding the model's weights and side
    files: only what a merge needs (the chosen weights, or an index and its shards)."""
    who = f"model '{ref}'"
    hub = _import_hub(who)
    with _quiet_hub_logs():
        pinned = _complete_pinned_snapshot(hub, repo_id, revision)
        if pinned is not None:
            return pinned  # a commit never changes: what the cache holds is what the hub has
        names = _listing(hub, who, repo_id, revision)
        if names is None:
            return _cached_snapshot(hub, who, repo_id, revision, weights=True)
        choice = choose_weights(names)
        if not choice.picked:
            raise _no_weights_on_hub(hub, who, repo_id, revision, choice, names)
        first = _download(hub, who, repo_id, choice.picked[0], revision)
        if is_index_name(choice.picked[0]):
            from mergesmith.sources.open import shard_names

            for shard in shard_names(first):
                if shard not in names:
                    raise MergeError(
                        f"{who}: its index lists shard '{shard}' that the hub does not have",
                        "the repository is incomplete at this revision; try another revision",
                    )
                _download(hub, who, repo_id, shard, revision)
        for name in choice.picked[1:]:
            _download(hub, who, repo_id, name, revision)
        for name in SIDE_FILES:
            if name in names:
                _download(hub, who, repo_id, name, revision)
        return first.parent


def fetch_tokenizer(ref: str, repo_id: str, revision: str | None) -> Path:
    """The local folder holding a hub model's tokenizer files; its weights are never fetched."""
    who = f"tokenizer source '{ref}'"
    hub = _import_hub(who)
    with _quiet_hub_logs():
        names = _listing(hub, who, repo_id, revision)
        if names is None:
            folder = _cached_snapshot(hub, who, repo_id, revision, weights=False)
        else:
            wanted = [n for n in SIDE_FILES if n in names]
            if "tokenizer_config.json" not in wanted:
                raise MergeError(
                    f"{who}: the hub repository {repo_id} has no tokenizer_config.json",
                    "take the tokenizer from another model, or from 'base'",
                )
            folder = None
            for name in wanted:
                folder = _download(hub, who, repo_id, name, revision).parent
            assert folder is not None
    if not (folder / "tokenizer_config.json").is_file():
        raise MergeError(
            f"{who}: the local hub cache has {repo_id} but not its tokenizer_config.json "
            f"({folder})",
            _offline_hint(repo_id),
        )
    return folder


def _import_hub(who: str) -> ModuleType:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.utils
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise MergeError(
            f"{who}: huggingface_hub is not installed", "pip install huggingface_hub"
        ) from None
    return huggingface_hub


@contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Silence huggingface_hub's logger (retry notices, fallbacks) for the duration."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _listing(hub: ModuleType, who: str, repo_id: str, revision: str | None) -> list[str] | None:
    """The repository's file names at `revision`, or None to use the local cache instead
    (offline mode, or a hub that cannot be reached while the cache has the model)."""
    if _offline(hub):
        return None
    timeout = getattr(hub.constants, "HF_HUB_ETAG_TIMEOUT", 10)
    try:
        info = hub.HfApi().model_info(repo_id, revision=revision, timeout=timeout)
    except Exception as exc:  # sorted below: anything else means "cannot use the hub"
        network = _network_cause(exc)
        status = getattr(getattr(exc, "response", None), "status_code", None)
        trouble = network is not None or status in (429, 500, 502, 503, 504)
        if not trouble or _snapshot(hub, repo_id, revision) is None:
            if network is not None:
                raise _unreachable(hub, who, network, timeout) from None
            raise _hub_error(hub, who, repo_id, revision, exc) from None
        why = (
            f"cannot be reached ({_describe(network, timeout)})"
            if network is not None
            else f"answered HTTP {status}"
        )
        log.warning("%s: the hub at %s %s; using the copy in the local cache", who, _host(hub), why)
        return None
    return [s.rfilename for s in (info.siblings or [])]


def _complete_pinned_snapshot(hub: ModuleType, repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of a commit given by its full hash, if it holds the weights (and
    every shard its index names): then the hub need not be asked at all."""
    if not revision or not _COMMIT.fullmatch(revision):
        return None
    folder = _snapshot(hub, repo_id, revision)
    if folder is None:
        return None
    choice = choose_weights(p.name for p in folder.iterdir() if p.is_file())
    if not choice.picked:
        return None
    names = list(choice.picked)
    if is_index_name(names[0]):
        from mergesmith.sources.open import shard_names

        try:
            names += shard_names(folder / names[0])
        except MergeError:
            return None
    return folder if all((folder / n).is_file() for n in names) else None


def _download(hub: ModuleType, who: str, repo_id: str, name: str, revision: str | None) -> Path:
    """One file into the hub cache; any failure becomes one MergeError naming the file."""
    timeout = getattr(hub.constants, "HF_HUB_ETAG_TIMEOUT", 10)
    try:
        return Path(hub.hf_hub_download(repo_id, name, revision=revision))
    except Exception as exc:  # the hub client raises many kinds; each is explained below
        network = _network_cause(exc)
        if network is not None:
            raise _unreachable(hub, who, network, timeout, name) from None
        if isinstance(exc, OSError) and not isinstance(exc, _hub_errors(hub)):
            raise MergeError(
                f"{who}: cannot save {name} into the hub cache "
                f"({exc.strerror or exc.__class__.__name__})",
                "free disk space, or point HF_HOME at a disk with room",
            ) from None
        raise _hub_error(hub, who, repo_id, revision, exc, name) from None


def _hub_errors(hub: ModuleType) -> tuple[type[BaseException], ...]:
    utils = hub.utils
    names = ("HfHubHTTPError", "EntryNotFoundError", "OfflineModeIsEnabled")
    return tuple(getattr(utils, n) for n in names if hasattr(utils, n))


def _hub_error(
    hub: ModuleType,
    who: str,
    repo_id: str,
    revision: str | None,
    exc: BaseException,
    name: str | None = None,
) -> MergeError:
    """An answer from the hub (or the client) that says no, as the user needs to read it."""
    utils = hub.utils
    host = _host(hub)
    kind = {c.__name__ for c in type(exc).__mro__}
    if "GatedRepoError" in kind:
        return MergeError(
            f"{who}: {repo_id} is gated on the hub ({host}): its files need an accepted licence",
            f"accept the conditions on its page ({_endpoint(hub)}/{repo_id}), then log in "
            "(hf auth login, or set HF_TOKEN)",
        )
    if "RepositoryNotFoundError" in kind:
        return MergeError(
            f"{who}: no model {repo_id} on the hub ({host}), and no such local folder",
            "check the spelling (org/name); for a private model, log in (hf auth login, or set "
            "HF_TOKEN); for a local model, check the path",
        )
    if "RevisionNotFoundError" in kind:
        return MergeError(
            f"{who}: {repo_id} has no revision '{revision}' on the hub ({host})",
            "check the branch, tag or commit after '@'",
        )
    if "EntryNotFoundError" in kind:
        return MergeError(
            f"{who}: the hub ({host}) lists {name} in {repo_id} but does not serve it",
            "try again later, or another revision",
        )
    if isinstance(exc, getattr(utils, "HFValidationError", ())):
        return MergeError(
            f"{who}: '{repo_id}' is not a valid hub id", "a hub id is org/name; or fix the path"
        )
    if isinstance(exc, getattr(utils, "OfflineModeIsEnabled", ())):
        return MergeError(
            f"{who}: HF_HUB_OFFLINE is set, so {name or repo_id} cannot be downloaded",
            _offline_hint(repo_id),
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    reason = _first_line(exc)
    answered = f"answered HTTP {status}" if status else "failed"
    what = name or f"the file list of {repo_id}"
    return MergeError(
        f"{who}: the hub ({host}) {answered} for {what} ({reason})",
        "check the id and your access to it; if the hub is having trouble, try again later or "
        "set HF_HUB_OFFLINE=1 to use the local cache",
    )


def _network_cause(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain that means the server never answered, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {c.__name__ for c in type(current).__mro__}
        if "OfflineModeIsEnabled" in names or "HfHubHTTPError" in names:
            return None
        for cls in type(current).__mro__:
            if cls.__name__ in _TRANSPORT_NAMES and cls.__module__.split(".")[0] in _HTTP_MODULES:
                return current
        if isinstance(current, (ConnectionError, TimeoutError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def _describe(exc: BaseException, timeout: float) -> str:
    """A network failure in a few words, then the library's own words."""
    text = _first_line(exc)
    low = text.lower()
    names = " ".join(c.__name__ for c in type(exc).__mro__).lower()
    if any(
        s in low
        for s in (
            "name or service not known",
            "temporary failure in name resolution",
            "nodename nor servname",
            "getaddrinfo",
            "no address associated",
            "name resolution",
        )
    ):
        return f"DNS lookup failed: {text}"
    if "refused" in low:
        return f"connection refused: {text}"
    if "timeout" in names or "timed out" in low:
        return f"no answer within {timeout:g} s: {text}"
    if "proxy" in names or "proxy" in low:
        return f"proxy error: {text}"
    if "ssl" in names or "certificate" in low:
        return f"TLS error: {text}"
    if "unreachable" in low:
        return f"network unreachable: {text}"
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else exc.__class__.__name__


def _unreachable(
    hub: ModuleType, who: str, exc: BaseException, timeout: float, name: str | None = None
) -> MergeError:
    what = f" for {name}" if name else ""
    return MergeError(
        f"{who}: cannot reach the hub at {_host(hub)}{what} ({_describe(exc, timeout)})",
        "check your network, proxy or HF_ENDPOINT; to work without network, point the recipe "
        "at a local folder or file, or set HF_HUB_OFFLINE=1 to use models already in the "
        f"local cache ({_cache_dir(hub)})",
    )


def _no_weights_on_hub(
    hub: ModuleType,
    who: str,
    repo_id: str,
    revision: str | None,
    choice: WeightsChoice,
    names: list[str],
) -> MergeError:
    at = f" at revision '{revision}'" if revision else ""
    if choice.candidates:
        return MergeError(
            f"{who}: the hub repository {repo_id}{at} holds several checkpoint files that are "
            f"not one sharded set ({', '.join(choice.candidates)})",
            f"download the one to merge (hf download {repo_id} FILE) and point the recipe at "
            "that file",
        )
    if choice.missing:
        return MergeError(
            f"{who}: the hub repository {repo_id}{at} holds an incomplete set of shards and no "
            f"index: {', '.join(choice.missing)} missing",
            "try another revision",
        )
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    adapter = any(name.startswith("adapter_model.") for name in choice.ignored)
    return MergeError(
        f"{who}: the hub repository {repo_id}{at} holds no weights mergesmith reads "
        f"(looked for {LOOKED_FOR}; it has {shown or 'no files'})",
        "it holds a LoRA adapter: name it after its model, as MODEL+ADAPTER"
        if adapter
        else "check the id: is this the model itself, and not an adapter or a quantized copy?",
    )


def _offline(hub: ModuleType) -> bool:
    check = getattr(hub.constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(hub.constants, "HF_HUB_OFFLINE", False))


def _cache_dir(hub: ModuleType) -> Path:
    return Path(hub.constants.HF_HUB_CACHE)


def _endpoint(hub: ModuleType) -> str:
    return str(getattr(hub.constants, "ENDPOINT", "https://huggingface.co")).rstrip("/")


def _host(hub: ModuleType) -> str:
    endpoint = _endpoint(hub)
    return urlparse(endpoint).netloc or endpoint


def _offline_hint(repo_id: str) -> str:
    return (
        f"download it while online (hf download {repo_id}), point HF_HUB_CACHE or HF_HOME at "
        "a cache that holds it, or use a local folder or file"
    )


def _snapshot(hub: ModuleType, repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder for `revision` (a branch, tag or commit), if there is one:
    the hub cache's own layout, models--ORG--NAME/{refs,snapshots}."""
    repo_dir = _cache_dir(hub) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    commit: str | None = rev if _COMMIT.fullmatch(rev) else None
    if commit is None:
        try:
            commit = (repo_dir / "refs" / rev).read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            return None
    folder = repo_dir / "snapshots" / commit
    return folder if commit and folder.is_dir() else None


def _cached_snapshot(
    hub: ModuleType, who: str, repo_id: str, revision: str | None, *, weights: bool
) -> Path:
    """The cached snapshot to use without the hub, or a MergeError saying what is missing."""
    offline = " (HF_HUB_OFFLINE is set, so nothing is downloaded)" if _offline(hub) else ""
    cache = _cache_dir(hub)
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    folder = _snapshot(hub, repo_id, revision)
    if folder is None and not repo_dir.is_dir():
        raise MergeError(
            f"{who}: not a local folder, and {repo_id} is not in the local hub cache "
            f"({cache}){offline}",
            _offline_hint(repo_id),
        )
    if folder is None:
        raise MergeError(
            f"{who}: the local hub cache ({cache}) has {repo_id} but not its revision "
            f"'{revision or 'main'}'{offline}",
            _offline_hint(f"{repo_id} --revision {revision or 'main'}"),
        )
    if weights:
        names = [p.name for p in folder.iterdir()]
        choice = choose_weights(names)
        if not choice.picked and not choice.candidates and not choice.missing:
            raise MergeError(
                f"{who}: the local hub cache has {repo_id} but not its weights ({folder} holds "
                f"{', '.join(sorted(names)) or 'nothing'}){offline}",
                _offline_hint(repo_id),
            )
    return folder
