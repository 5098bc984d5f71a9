"""Model paths that are diffusers pipelines: a local folder or a Hugging Face id, resolved to local files.

``--load`` (inference and finetuning) and the cluster scripts' ``MODEL_PATH`` take, besides a SAT folder, a
diffusers CogVideoX pipeline folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``) or the Hugging Face id of one (``THUDM/CogVideoX-5b``, ``THUDM/CogVideoX1.5-5B-I2V``, ...).
:func:`resolve` turns either into a checked :class:`PipelineFolder`; the weights are mapped into the SAT modules
by :mod:`sat_cogvideo.convert.diffusers_source`.

The Hub work is ``huggingface_hub``'s (its cache under ``HF_HOME``, ``HF_ENDPOINT`` mirrors, ``HF_HUB_OFFLINE``,
revisions, progress bars); here are only the choices of this project: ``model_index.json`` is fetched first and a
repository that is not a CogVideoX pipeline is refused before anything large is downloaded; then only the files
the SAT engine reads are fetched (configs, safetensors weights, tokenizer files; no ``.bin`` duplicates); every
failure is one :class:`~sat_cogvideo.errors.UserError` line naming the id, the cache, ``HF_ENDPOINT`` /
``HF_HUB_OFFLINE`` and the missing files.

``python -m sat_cogvideo.hub ID [--revision R]`` downloads what the SAT path needs into the cache and prints the
local folder: the pre-download step for compute nodes without internet (then ``HF_HUB_OFFLINE=1`` there).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import List, Optional

from sat_cogvideo.errors import UserError, run_cli

PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
PIPELINES = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")
# what the SAT engine reads of a pipeline repository (huggingface_hub allow_patterns)
ALLOW_PATTERNS = ["model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                  "transformer/diffusion_pytorch_model*.safetensors*", "vae/config.json",
                  "vae/diffusion_pytorch_model*.safetensors*", "text_encoder/config.json",
                  "text_encoder/model*.safetensors*", "tokenizer/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DEFAULT_ENDPOINT = "https://huggingface.co"


def add_hub_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--revision``: the branch, tag or commit of a Hugging Face id given to ``--load``."""
    parser.add_argument("--revision", type=str, default=None,
                        help="with --load <Hugging Face id>: the branch, tag or commit to use (default main)")
    return parser


def is_hub_id(text) -> bool:
    """Whether ``text`` has the form of a Hub id (``org/name``) and is not a local path: it does not exist, and
    neither does its first component as a folder here (``outputs/run1`` with ``outputs/`` present is a mistyped
    local path, not a repository)."""
    text = os.fspath(text)
    return (_HUB_ID.match(text) is not None and not os.path.exists(text) and not text.startswith((".", "~"))
            and not os.path.isdir(text.split("/")[0]))


def is_pipeline_folder(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "model_index.json"))


def is_pipeline_path(path) -> bool:
    """Whether ``path`` names a diffusers pipeline: a local folder with ``model_index.json``, or a Hub id."""
    return bool(path) and (is_pipeline_folder(path) or is_hub_id(path))


@dataclass(frozen=True)
class PipelineFolder:
    """A local diffusers CogVideoX pipeline folder (checked complete), and where it came from."""
    root: str
    pipeline: str                 # model_index.json's _class_name
    repo_id: Optional[str] = None
    revision: Optional[str] = None

    def part(self, name: str) -> str:
        return os.path.join(self.root, name)

    @property
    def source(self) -> str:
        return f"{self.repo_id} ({self.root})" if self.repo_id else self.root


# --------------------------------------------------------------------------------------------------------------
# checks of a local folder


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable JSON ({err}): fetch it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON table")
    return data


def pipeline_class(root: str, where: str) -> str:
    """``_class_name`` of ``model_index.json``; a UserError unless it is a CogVideoX pipeline."""
    index = _read_json(os.path.join(root, "model_index.json"))
    cls = str(index.get("_class_name", ""))
    if cls not in PIPELINES:
        raise UserError(f"{where} is a {cls or 'diffusers'} pipeline, not a CogVideoX one (model_index.json names "
                        f"{cls or 'no class'}): give a CogVideoX repository such as THUDM/CogVideoX-5b")
    return cls


def _weights_missing(folder: str, prefix: str) -> List[str]:
    """Relative names of the missing weight files of one part ([] when complete)."""
    index = os.path.join(folder, f"{prefix}.safetensors.index.json")
    if os.path.isfile(index):
        try:
            shards = sorted(set(_read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError, TypeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
        return [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    return [] if os.path.isfile(os.path.join(folder, f"{prefix}.safetensors")) else [f"{prefix}.safetensors"]


def missing_files(root: str) -> List[str]:
    """The files of a pipeline folder the SAT engine needs and does not find (relative names)."""
    missing = [] if os.path.isfile(os.path.join(root, "model_index.json")) else ["model_index.json"]
    for part, prefix in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                         ("text_encoder", "model")):
        folder = os.path.join(root, part)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            missing.append(f"{part}/config.json")
        missing += [f"{part}/{name}" for name in _weights_missing(folder, prefix)]
    tok = os.path.join(root, "tokenizer")
    if not any(os.path.isfile(os.path.join(tok, n)) for n in ("spiece.model", "tokenizer.json")):
        missing.append("tokenizer/spiece.model (or tokenizer.json)")
    return missing


def _short(names: List[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_pipeline_folder(root: str, where: str, repo_id: Optional[str] = None,
                          revision: Optional[str] = None) -> PipelineFolder:
    """A complete CogVideoX pipeline folder, or one UserError naming what is wrong or missing."""
    cls = pipeline_class(root, where)
    missing = missing_files(root)
    if missing:
        fix = (f"download it again (python -m sat_cogvideo.hub {repo_id})" if repo_id else
               "copy the complete pipeline folder (CogVideoXPipeline.save_pretrained writes all of it)")
        raise UserError(f"{where} is an incomplete diffusers pipeline: missing {_short(missing)}; {fix}")
    from sat_cogvideo.convert.safetensors_io import read_header, weight_files

    for part, prefix in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                         ("text_encoder", "model")):
        for path in weight_files(os.path.join(root, part), prefix):
            read_header(path)  # a truncated download is one line now, not a traceback later
    return PipelineFolder(os.path.abspath(root), cls, repo_id, revision)


# --------------------------------------------------------------------------------------------------------------
# the Hub


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_error(err: Exception, repo_id: str, revision: Optional[str], what: str) -> UserError:
    """One line for a huggingface_hub failure."""
    from huggingface_hub import errors as hf

    rev = f" at revision {revision}" if revision else ""
    if isinstance(err, hf.GatedRepoError):
        return UserError(f"{what} {repo_id} is gated on {_endpoint()}: accept its licence on the model page and log "
                         f"in (hf auth login), or download it elsewhere and pass the folder")
    if isinstance(err, hf.RepositoryNotFoundError):
        return UserError(f"{what} {repo_id} is neither a local folder nor a model repository on {_endpoint()} "
                         f"(private repositories need hf auth login): check the id or the path")
    if isinstance(err, hf.RevisionNotFoundError):
        return UserError(f"{what} {repo_id} has no revision {revision!r}: fix --revision")
    if isinstance(err, getattr(hf, "RemoteEntryNotFoundError", ())):
        return UserError(f"{what} {repo_id}{rev} has no model_index.json: it is not a diffusers pipeline "
                         f"repository; give a CogVideoX pipeline such as THUDM/CogVideoX-5b")
    if _offline() or isinstance(err, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)):
        state = "HF_HUB_OFFLINE=1 forbids downloading" if _offline() else f"{_endpoint()} cannot be reached"
        return UserError(f"{what} {repo_id}{rev} is not in the Hugging Face cache {_cache_dir()} and {state}: "
                         f"missing model_index.json, transformer/, vae/, text_encoder/, tokenizer/; download it "
                         f"first where there is internet (python -m sat_cogvideo.hub {repo_id}, same HF_HOME), or "
                         f"unset HF_HUB_OFFLINE / set HF_ENDPOINT to a reachable mirror")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return UserError(f"cannot download {what} {repo_id}{rev} from {_endpoint()} ({type(err).__name__}: {first}): "
                     f"check the network or set HF_ENDPOINT to a mirror (e.g. https://hf-mirror.com)")


def download(repo_id: str, revision: Optional[str] = None, what: str = "--load") -> PipelineFolder:
    """The local snapshot of a Hub pipeline: ``model_index.json`` first (a repository that is not CogVideoX is
    refused before the weights), then the files the SAT engine reads; from the cache when offline."""
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise UserError(f"{what} {repo_id} is a Hugging Face id but huggingface_hub is not installed: "
                        f"pip install huggingface_hub") from None
    try:
        index = hf_hub_download(repo_id, "model_index.json", revision=revision)
        pipeline_class(os.path.dirname(index), f"{what} {repo_id}")
        root = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except UserError:
        raise
    except Exception as err:  # huggingface_hub and httpx raise many types
        raise _hub_error(err, repo_id, revision, what) from None
    missing = missing_files(root)
    if missing:
        state = ("HF_HUB_OFFLINE=1 forbids downloading them" if _offline() else
                 f"{_endpoint()} did not provide them")
        raise UserError(f"{what} {repo_id} in the Hugging Face cache {_cache_dir()} lacks {_short(missing)} and "
                        f"{state}: download them first (python -m sat_cogvideo.hub {repo_id}, same HF_HOME), or "
                        f"unset HF_HUB_OFFLINE / set HF_ENDPOINT to a reachable mirror")
    return check_pipeline_folder(root, f"{what} {repo_id}", repo_id, revision)


def resolve(path, revision: Optional[str] = None, what: str = "--load") -> PipelineFolder:
    """A diffusers pipeline folder, or the Hub id of one, as a checked local :class:`PipelineFolder`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if revision:
            raise UserError(f"--revision {revision} applies to Hugging Face ids, but {what} {path} is a local folder")
        return check_pipeline_folder(path, f"{what} {path}")
    if is_hub_id(path):
        return download(path, revision, what)
    raise UserError(f"{what} {path} is neither a local folder nor a Hugging Face id (org/name)")


@run_cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sat_cogvideo.hub",
        description="Download what the SAT path reads of a diffusers CogVideoX pipeline into the Hugging Face cache "
                    "(honours HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE) and print its local folder.")
    parser.add_argument("model", help="a Hugging Face id (THUDM/CogVideoX1.5-5b) or a local pipeline folder")
    add_hub_args(parser)
    args = parser.parse_args(argv)
    folder = resolve(args.model, args.revision, what="model")
    print(folder.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
