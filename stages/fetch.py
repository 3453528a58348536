"""fetch: make both sources present on local disk and record what they are.

`local:` sources are validated in place (nothing is copied). `repo:` sources come through huggingface_hub into its
cache (HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE honoured; partial downloads resume), with allow_patterns so
only the needed files travel. The result, `.pipeline/sources.json`, lists every file with its size and a content
hash (local) or the hub commit it came from (repo), so downstream stages rerun only when content really changes.
"""
from __future__ import annotations

import errno
import fnmatch
import json
from pathlib import Path

from .dag import Context, Result, Stage
from .errors import PipelineError
from .formats import check_split_set, gguf_sets
from .fsio import hash_file, inside, read_json, write_json
from .manifest import Source
from .ui import byte_progress, console

VERSION = 1
RESULT = ".pipeline/sources.json"
HASH_CACHE = ".pipeline/hash-cache.json"
FP8_PATTERNS = ["config.json", "generation_config.json", "model.safetensors.index.json", "*.safetensors",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt"]
DOWNLOAD_ATTEMPTS = 3


# -- local sources: what must be there ----------------------------------------------------------------------------

def fp8_files(src: Source, root: Path) -> list[str]:
    """Relative names of the checkpoint files to use, after checking the folder looks like an HF checkpoint."""
    where = f"sources.fp8 ({root})"
    _no_loop(root, where)
    if root.is_file():
        kind = "a GGUF file" if root.suffix == ".gguf" else "a file"
        raise PipelineError(f"{where}: is {kind}; sources.fp8 wants the FP8 checkpoint folder (config.json + shards)")
    if not root.is_dir():
        raise PipelineError(f"{where}: no such folder")
    if not (root / "config.json").is_file():
        ggufs = sorted(p.name for p in root.glob("*.gguf"))
        hint = f" (it holds {ggufs[0]}: did you swap sources.fp8 and sources.gguf?)" if ggufs else ""
        raise PipelineError(f"{where}: no config.json: not an HF checkpoint folder{hint}")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise PipelineError(f"{index}: not a safetensors index (no weight_map)") from None
        for s in shards:
            inside(root, s, f"{index}: weight_map")
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise PipelineError(f"{index}: names shard {missing[0]}, which is missing"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        files = ["model.safetensors.index.json", *shards]
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise PipelineError(f"{where}: no model.safetensors.index.json and no model.safetensors")
    extras = [n for n in FP8_PATTERNS if "*" not in n and n not in files and (root / n).is_file()]
    return sorted(set(files + extras))


def gguf_files(src: Source, root: Path) -> tuple[list[str], Path]:
    """Relative names of the GGUF model's files (one file, or a complete split set), in part order."""
    where = f"sources.gguf ({root})"
    _no_loop(root, where)
    if root.is_file():
        if root.suffix != ".gguf":
            raise PipelineError(f"{where}: not a .gguf file")
        base = root.parent
        sets = gguf_sets(list(base.glob("*.gguf")))
        found = next(s for s in sets.values() if root in s)
    elif root.is_dir():
        base = root
        pattern = src.include or "*.gguf"
        found = [p for p in sorted(root.rglob("*.gguf")) if fnmatch.fnmatch(str(p.relative_to(root)), pattern)
                 or fnmatch.fnmatch(p.name, pattern)]
        if not found:
            st = sorted(p.name for p in root.glob("*.safetensors"))
            hint = (f" (it holds {st[0]}: did you swap sources.fp8 and sources.gguf?)" if st else "")
            raise PipelineError(f"{where}: no .gguf file matching {pattern}{hint}")
        sets = gguf_sets(found)
        if len(sets) > 1:
            raise PipelineError(f"{where}: holds several GGUF models ({', '.join(sorted(sets))}); "
                                "pick one with `include:` in the manifest")
        found = next(iter(sets.values()))
    else:
        raise PipelineError(f"{where}: no such file or folder")
    check_split_set(found)
    return [str(p.relative_to(base)) for p in found], base


def _no_loop(root: Path, where: str) -> None:
    """A symlink loop is not 'no such folder': say what it is."""
    try:
        root.resolve(strict=True)
    except RuntimeError:                       # Python < 3.13 raises this for a loop
        raise PipelineError(f"{where}: symlink loop") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PipelineError(f"{where}: symlink loop") from None


# -- hub sources ----------------------------------------------------------------------------------------------------

def download(src: Source) -> tuple[Path, str]:
    """snapshot_download with the needed patterns; returns (snapshot folder, commit sha).

    What resumes, with huggingface_hub 2.4.0: within one call it retries a broken transfer itself (up to 5 times,
    with `Range: bytes=K-` from the last whole 10 MiB chunk it received), and every file that completed stays in the
    cache. Its partial file is private to the call and deleted when the call fails, so when it gives up, our retry
    (a new call) fetches again only the file(s) that broke, from their start. Only transient failures (connection
    cut, timeout, short read, HTTP 5xx/429) are retried; everything else is one clear line for the user.
    """
    import contextlib
    import errno

    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import disable_progress_bars
    from rich.markup import escape

    where = f"sources.{src.kind}: {src.repo}@{src.revision}"
    patterns = FP8_PATTERNS if src.kind == "fp8" else [src.include or "*.gguf"]
    # Off a terminal (logs, CI) our own bars are off; silence huggingface_hub's tqdm bars too (\r noise), unless
    # HF_HUB_DISABLE_PROGRESS_BARS says otherwise.
    quiet = not console.is_terminal and constants.HF_HUB_DISABLE_PROGRESS_BARS is None
    console.print(f"fetch {src.repo}@{src.revision}" + (f" ({src.include})" if src.include else "")
                  + f" into {constants.HF_HUB_CACHE}", markup=False, soft_wrap=True)
    last = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            with disable_progress_bars() if quiet else contextlib.nullcontext():
                path = Path(huggingface_hub.snapshot_download(repo_id=src.repo, revision=src.revision,
                                                              allow_patterns=patterns))
            return path, path.name
        except GatedRepoError:
            raise PipelineError(f"{where}: gated repo: accept its terms on the hub, then set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise PipelineError(f"sources.{src.kind}: repo {src.repo} not found (or private: set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise PipelineError(f"{where}: no revision {src.revision} in {src.repo}") from None
        except LocalEntryNotFoundError as e:         # includes IncompleteSnapshotError
            if constants.is_offline_mode():
                raise PipelineError(f"{where}: not (completely) in the local cache {constants.HF_HUB_CACHE}, and "
                                    "offline mode (HF_HUB_OFFLINE) forbids downloading it") from None
            raise PipelineError(f"{where}: not in the local cache and the hub cannot be reached "
                                f"({_first_line(e)})") from None
        except HFValidationError as e:
            raise PipelineError(f"sources.{src.kind}: {_first_line(e)}") from None
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            detail = e.server_message.splitlines()[0] if e.server_message else _first_line(e)
            if status in (401, 403):
                raise PipelineError(f"{where}: access denied (HTTP {status}: {detail}); check HF_TOKEN") from None
            if status is not None and status < 500 and status != 429:
                raise PipelineError(f"{where}: HTTP {status}: {detail}") from None
            last = e                                 # hub overloaded or down for a moment: retry
        except (httpx2.TransportError, OSError) as e:   # cut connection, timeout, short read: retry
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
                raise PipelineError(f"{where}: cannot write the hub cache {constants.HF_HUB_CACHE}: "
                                    f"{e.strerror or _first_line(e)}") from None
            last = e
        except Exception as e:                       # not transient: no retry, one line
            raise PipelineError(f"{where}: download failed: {type(e).__name__}: {_first_line(e)}") from None
        if attempt + 1 < DOWNLOAD_ATTEMPTS:
            console.print(f"[yellow]download of {src.repo} interrupted ({escape(_first_line(last))}); "
                          f"retrying ({attempt + 1}/{DOWNLOAD_ATTEMPTS - 1})[/]", soft_wrap=True)
    raise PipelineError(f"{where}: download failed after {DOWNLOAD_ATTEMPTS} attempts: {_first_line(last)}")


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- the stage ------------------------------------------------------------------------------------------------------

def _stat_list(root: Path, names: list[str]) -> list:
    return [[n, (root / n).stat().st_size, (root / n).stat().st_mtime_ns] for n in names]


def locate(ctx: Context, src: Source) -> tuple[Path, list[str]]:
    """The local root and file list of a local source (cheap: names and stats only)."""
    if src.kind == "fp8":
        return src.local, fp8_files(src, src.local)
    names, base = gguf_files(src, src.local)
    return base, names


def fingerprint(ctx: Context) -> dict:
    fp = {}
    for src in (ctx.manifest.fp8, ctx.manifest.gguf):
        if src.repo:
            fp[f"sources.{src.kind}"] = src.raw        # a pinned revision pins the content
        else:
            root, names = locate(ctx, src)
            fp[f"sources.{src.kind}"] = {"root": str(root), "files": _stat_list(root, names)}
    return fp


def run(ctx: Context) -> Result:
    # Hashes are cached by (size, mtime) outside the result, so a touched but unchanged file reruns nothing downstream.
    cache_path = ctx.out / HASH_CACHE
    cache = read_json(cache_path) if cache_path.exists() else {}
    result, kept = {}, {}
    for src in (ctx.manifest.fp8, ctx.manifest.gguf):
        if src.repo:
            snapshot, commit = download(src)
            local = Source(kind=src.kind, local=snapshot, include=src.include)
            root, names = locate(ctx, local)
            files = {n: {"size": (root / n).stat().st_size, "hash": f"hub:{src.repo}@{commit}"} for n in names}
            result[src.kind] = {"root": str(root), "repo": src.repo, "revision": commit, "files": files,
                                "order": names}
            continue
        root, names = locate(ctx, src)
        stats = {n: (root / n).stat() for n in names}
        key = lambda n: f"{root / n}:{stats[n].st_size}:{stats[n].st_mtime_ns}"
        todo = [n for n in names if key(n) not in cache]
        if todo:
            with byte_progress(f"hash {src.kind}", sum(stats[n].st_size for n in todo), len(todo), "files") as adv:
                for n in todo:
                    cache[key(n)] = hash_file(root / n, adv)
                    adv(0, 1)
        kept.update({key(n): cache[key(n)] for n in names})
        files = {n: {"size": stats[n].st_size, "hash": cache[key(n)]} for n in names}
        result[src.kind] = {"root": str(root), "revision": None, "files": files, "order": names}
    write_json(cache_path, kept, ctx.out)
    write_json(ctx.out / RESULT, result, ctx.out)
    n_bytes = sum(f["size"] for s in result.values() for f in s["files"].values())
    return Result(result=RESULT, outputs=[RESULT],
                  summary=f"{len(result['fp8']['files'])} checkpoint files + {len(result['gguf']['files'])} GGUF "
                          f"files, {n_bytes / 1e9:.2f} GB")


STAGE = Stage("fetch", needs=(), inputs="manifest sources (local folders or hub repos)",
              outputs=".pipeline/sources.json (files, sizes, content hashes / hub commits)", version=VERSION,
              fingerprint=fingerprint, run=run)
