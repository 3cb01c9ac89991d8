"""The capability report: can this model be fine-tuned here? A list of named checks, each ok/detail.

The report does not decide the approach (``fine_tuner`` does); it only says what is true. Checks
that need nothing external (trainer packages importable, base weights configured) always run; the
Ollama checks run when a client is given; the base-weight checks come from ``training`` (the
parent side, which never imports the ML libraries).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Config
    from .ollama import OllamaClient

TRAINER_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors")
# The device nodes CUDA needs to see one GPU (/dev/nvidia-uvm is created when CUDA starts).
NVIDIA_DEVICES = ("nvidiactl", "nvidia0")
# Ollama converts safetensors LoRA adapters only for these GGUF architectures (reference §5).
ADAPTER_ARCHITECTURES = ("llama", "gemma2")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # a failed optional check is reported but does not block fine-tuning


@dataclass
class CapabilityReport:
    model: str
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # e.g. architecture, quantization, weights dir
    # the Modelfile Ollama's /api/show wrote (its FROM names the GGUF Ollama serves): kept for the
    # fine-tune's own weight lookup, never written out (a path of the server's machine)
    ollama_modelfile: str | None = field(default=None, repr=False, compare=False)

    @property
    def supported(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks if c.required)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.required and not c.ok]

    def add(self, name: str, ok: bool, detail: str, *, required: bool = True) -> Check:
        check = Check(name, bool(ok), detail, required)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "supported": self.supported,
                "checks": [asdict(c) for c in self.checks], "facts": dict(self.facts)}

    def __bool__(self) -> bool:  # the seed's check_fine_tuning_capability returned a bool
        return self.supported


def package_checks(report: CapabilityReport) -> None:
    """Trainer packages importable, found with ``find_spec`` so that nothing heavy is imported."""
    missing = [name for name in TRAINER_PACKAGES if importlib.util.find_spec(name) is None]
    report.add("trainer_packages", not missing,
               "torch, transformers, peft, accelerate and safetensors are installed" if not missing
               else f"missing {', '.join(missing)}: install the extra with pip install 'fine-tuner[train]'")


def torch_build(site_dirs: list[str] | None = None) -> tuple[str, bool] | None:
    """``(version, is a CUDA build)`` of the installed torch, read from its package metadata (torch is
    never imported here); None when it is not installed. A CUDA build is a ``+cu`` version, or a
    version without a local part (PyPI's Linux wheels) whose ``nvidia-cuda-runtime*`` requirement is
    installed. ``site_dirs``: where to look instead of ``sys.path``."""
    import importlib.metadata as md

    where = {} if site_dirs is None else {"path": list(site_dirs)}
    torch = next(iter(md.distributions(name="torch", **where)), None)
    if torch is None:
        return None
    version = torch.version
    if "+" in version:
        return version, "+cu" in version
    for requirement in torch.requires or []:
        name = re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if name.startswith("nvidia-cuda-runtime") and next(iter(md.distributions(name=name, **where)), None):
            return version, True
    return version, False


GPU_DROP_IN = ("under systemd, install the GPU drop-in (systemd/gpu.conf into "
               "/etc/systemd/system/fine-tuner.service.d/, then systemctl daemon-reload and restart the "
               "service: PrivateDevices=yes hides the GPU); otherwise check the NVIDIA driver with nvidia-smi")


def gpu_check(report: CapabilityReport, *, dev_dir: str | os.PathLike = "/dev",
              site_dirs: list[str] | None = None) -> None:
    """``gpu_device``: whether a CUDA build of torch has an NVIDIA GPU to train on (``nvidiactl`` and
    ``nvidia0`` in ``dev_dir``). Never required: without one, a fine-tune trains on the CPU, which
    this check says out loud (a unit that hides the GPU would otherwise make training silently
    slow). Nothing is reported when torch is not installed (``trainer_packages`` says so)."""
    build = torch_build(site_dirs)
    if build is None:
        return
    version, cuda = build
    missing = [name for name in NVIDIA_DEVICES if not os.path.exists(os.path.join(dev_dir, name))]
    shown = ", ".join(os.path.join(dev_dir, name) for name in missing or NVIDIA_DEVICES)
    report.facts["torch_version"] = version
    if cuda and not missing:
        report.add("gpu_device", True, f"torch {version} is a CUDA build and the NVIDIA GPU is visible "
                   f"({shown}): fine-tunes train on the GPU", required=False)
    elif cuda:
        report.add("gpu_device", False, f"torch {version} is a CUDA build but no NVIDIA GPU is visible "
                   f"({shown} missing), so fine-tunes will train on the CPU: {GPU_DROP_IN}", required=False)
    elif not missing:
        report.add("gpu_device", False, f"an NVIDIA GPU is visible ({shown}) but torch {version} is not a "
                   "CUDA build, so fine-tunes will train on the CPU: install a CUDA build of torch",
                   required=False)
    else:
        report.add("gpu_device", True, f"torch {version} is not a CUDA build and no NVIDIA GPU is visible: "
                   "fine-tunes train on the CPU", required=False)


def backend_check(report: CapabilityReport, backend: str) -> None:
    """axolotl and accelerate installed, for ``training.backend: axolotl`` (required then; shown
    as optional otherwise, so that ``fine-tuner check`` says whether switching would work). Found
    with ``find_spec``, never imported: axolotl itself runs in the trainer's processes."""
    import importlib.metadata

    from ..training.axolotl_trainer import axolotl_missing

    why = axolotl_missing()
    if why is None:
        version = importlib.metadata.version("axolotl")
        report.facts["axolotl_version"] = version
        detail = (f"axolotl {version} and accelerate are installed: training.backend axolotl runs "
                  "accelerate launch -m axolotl.cli.train on the job's training_config.yaml")
    else:
        detail = why + ("" if backend == "axolotl" else " (only needed for training.backend: axolotl)")
    report.add("axolotl_backend", why is None, detail, required=backend == "axolotl")


def _llama_server() -> str:
    """Where the llama-server ``fine-tuner serve`` runs is, or that it is not built."""
    from ..llamacpp import server_binary

    found = server_binary()
    return str(found) if found is not None else "not built (make llama-cpp)"


def weights_checks(report: CapabilityReport, cfg: Config, ollama_arch: str | None) -> None:
    """Base weights found, of an architecture Ollama takes adapters for (and the same as the Ollama
    model's when known), with a chat template. Reads files only (``training.resolve_base_weights``)."""
    from ..training.supervisor import (ADAPTER_MODEL_TYPES, adapter_format, gguf_converter, hf_cache_dir,
                                       hf_endpoint, resolve_base_weights, with_tag)

    model = report.model
    base = resolve_base_weights(model, cfg.base_models, allow_download=cfg.training.allow_download,
                                ollama_models_dir=cfg.ollama.models_dir,
                                show_modelfile=report.ollama_modelfile)
    report.facts.update(weights_dir=base.local_dir, model_type=base.model_type, hf_id=base.hf_id,
                        weights_source=base.source, weights_quantization=base.quantization,
                        weights_architecture=base.model_type, template=base.template,
                        gguf_file=Path(base.gguf_path).name if base.gguf_path else None,
                        gguf_sha256=base.gguf_sha256, weights_found_by=base.found_by,
                        adapter_format=adapter_format(base.model_type) if base.model_type else None,
                        llama_server=_llama_server())
    if base.gguf_path is not None and base.problem is None:
        report.add("base_weights", True,
                   f"the {base.quantization or 'unquantized'} GGUF {Path(base.gguf_path).name} ({base.source}; "
                   f"{base.found_by}): trained on its dequantized weights, exactly the weights Ollama serves")
    elif base.local_dir is not None and base.gguf_path is None:
        report.add("base_weights", True, f"Hugging Face weights for {model} found in {base.local_dir}")
    elif base.ref is not None and base.problem is None:
        # passes (the trainer may download them) but says so: the download is large and can fail
        report.add("base_weights", True,
                   f"the weights of {base.hf_id} are not on disk (not in the Hugging Face cache "
                   f"{hf_cache_dir()}) and will have to be downloaded from {hf_endpoint()} when training "
                   "starts (training.allow_download is on; a gated model needs a token in HF_TOKEN): "
                   f"to have them on disk beforehand, run `hf download {base.hf_id}`")
    else:
        detail = base.problem or f"no Hugging Face weights found for {model}"
        if base.ref is None and base.gguf_path is None:  # an Ollama blob found has its own problem
            detail = (f"no Hugging Face weights are known for {model}: add `{with_tag(model)}: "
                      f"<weights dir or HF repo id>` under base_models: in the config")
        report.add("base_weights", False, detail)

    # Weights still to be downloaded cannot be inspected yet; the trainer checks them after download.
    pending = base.local_dir is None and base.ref is not None and base.problem is None
    if base.model_type is None:
        report.add("weights_architecture", False,
                   "unknown until the base weights are on disk (config.json model_type)",
                   required=not pending)
    else:
        arch = ADAPTER_MODEL_TYPES.get(base.model_type) or (base.model_type if base.gguf_path else None)
        if arch is None and gguf_converter() is not None:
            report.add("weights_architecture", True,
                       f"model_type {base.model_type!r}: registered with the GGUF adapter llama.cpp's "
                       f"converter writes (Ollama converts safetensors adapters only for "
                       f"{', '.join(sorted(ADAPTER_MODEL_TYPES))} models)")
        elif arch is None:
            report.add("weights_architecture", False,
                       f"config.json model_type is {base.model_type!r}; Ollama converts LoRA adapters only "
                       f"for {', '.join(sorted(ADAPTER_MODEL_TYPES))} models, and llama.cpp's converter for "
                       "a GGUF adapter is not on this machine: run `make llama-cpp`")
        elif base.gguf_path is not None and arch not in ADAPTER_MODEL_TYPES.values() and gguf_converter() is None:
            report.add("weights_architecture", False,
                       f"the GGUF is a {arch!r} model; Ollama converts safetensors adapters only for "
                       f"{', '.join(sorted(set(ADAPTER_MODEL_TYPES.values())))}, and llama.cpp's converter "
                       "for a GGUF adapter is not on this machine: run `make llama-cpp`")
        elif ollama_arch is not None and arch != ollama_arch:
            report.add("weights_architecture", False,
                       f"the weights are {base.model_type!r} ({arch} in Ollama) but the Ollama model "
                       f"{model} is {ollama_arch!r}: configure the weights of the same base model")
        else:
            same = ", the same as the Ollama model" if ollama_arch is not None else ""
            report.add("weights_architecture", True,
                       f"config.json model_type {base.model_type!r} ({arch} in Ollama{same})")

    if base.local_dir is None:
        report.add("chat_template", False, "unknown until the base weights are on disk",
                   required=not pending)
    else:
        report.add("chat_template", base.has_chat_template,
                   base.template if base.has_chat_template else
                   base.problem or f"no chat template in {base.local_dir} (tokenizer_config.json or "
                   "chat_template.jinja) and no known turn format: use the instruct/chat variant of the weights")


def ollama_checks(report: CapabilityReport, client: OllamaClient, register_mode: str) -> str | None:
    """Ollama reachable (``ollama_reachable``), the model known (``ollama_model``), its architecture
    takes a safetensors LoRA (``adapter_architecture``), and a note on a quantized base
    (``base_quantization``, never required). Facts: ``ollama_version``, ``architecture``, ``format``,
    ``family``, ``parameter_size``, ``quantization_level``. Returns ``general.architecture`` or None.

    Which checks are required depends on ``register_mode``: with ``"required"`` all three are,
    because the job fails without registration. With ``"off"`` none is: the adapter can be
    produced without Ollama. With ``"auto"`` an unreachable server is not required (the job
    registers nothing, records why and still succeeds; the base weights' own ``model_type`` check
    covers the architecture then), but once the server answers, an unknown model or an
    architecture Ollama cannot attach an adapter to is required: the answer is then known, and
    a fine-tune that Ollama refuses to serve is not what the user asked for.
    """
    from ..errors import OllamaError
    from ..training.supervisor import gguf_converter

    model = report.model
    hard = register_mode == "required"
    known = register_mode != "off"  # required once the server has answered
    try:
        version = client.version()
    except OllamaError as exc:
        # the client's message already names the server and what happened
        report.add("ollama_reachable", False, str(exc), required=hard)
        skipped = "not checked: Ollama is not reachable"
        report.add("ollama_model", False, skipped, required=hard)
        report.add("adapter_architecture", False, skipped, required=hard)
        return None
    report.facts["ollama_version"] = version
    report.add("ollama_reachable", True, f"Ollama {version} answers at {client.base_url}", required=hard)

    try:
        info = client.show(model)
    except OllamaError as exc:
        if exc.status == 404:
            detail = f"{model!r} is not in Ollama at {client.base_url}: run ollama pull {model}"
        else:
            detail = f"could not read {model!r} from Ollama: {exc}"
        report.add("ollama_model", False, detail, required=known)
        report.add("adapter_architecture", False, "not checked: the model is not available in Ollama",
                   required=known)
        return None
    details = info.get("details") if isinstance(info.get("details"), dict) else {}
    model_info = info.get("model_info") if isinstance(info.get("model_info"), dict) else {}
    arch = model_info.get("general.architecture") or details.get("family") or None
    report.facts.update(architecture=arch, format=details.get("format"), family=details.get("family"),
                        parameter_size=details.get("parameter_size"),
                        quantization_level=details.get("quantization_level"))
    report.add("ollama_model", True, f"{model!r} is in Ollama ({details.get('parameter_size') or 'size unknown'}, "
               f"{details.get('format') or 'format unknown'})", required=known)

    supported = ", ".join(ADAPTER_ARCHITECTURES)
    report.ollama_modelfile = str(info.get("modelfile") or "")
    if arch in ADAPTER_ARCHITECTURES:
        report.add("adapter_architecture", True,
                   f"architecture {arch!r} takes a safetensors LoRA adapter in Ollama", required=known)
    elif gguf_converter() is not None:
        report.add("adapter_architecture", True,
                   f"architecture {arch!r} takes the GGUF LoRA adapter that llama.cpp's converter writes "
                   f"(Ollama converts safetensors adapters only for {supported})", required=known)
    else:
        report.add("adapter_architecture", False,
                   f"architecture {arch!r} cannot take a safetensors LoRA adapter in Ollama (only {supported}; "
                   f"Mistral reports llama) and llama.cpp's adapter converter is not on this machine: run "
                   f"`make llama-cpp`, or use approach model_set", required=known)

    level = details.get("quantization_level")
    if level and str(level).upper() not in ("F16", "BF16", "F32"):
        report.add("base_quantization", False,
                   f"the Ollama base is quantized ({level}); the adapter is trained on full-precision "
                   f"weights and will be applied to the quantized base, so answers may differ slightly",
                   required=False)
    else:
        report.add("base_quantization", True, f"the Ollama base is not quantized ({level or 'unknown'})",
                   required=False)
    return arch


def build_report(model_name: str, cfg: Config, client: OllamaClient | None = None) -> CapabilityReport:
    """Run every check for ``model_name``; ``client`` None skips the Ollama checks."""
    report = CapabilityReport(model=model_name)
    package_checks(report)
    gpu_check(report)
    backend_check(report, cfg.training.backend)
    arch = ollama_checks(report, client, cfg.ollama.register) if client is not None else None
    weights_checks(report, cfg, arch)
    return report
