"""The vLLM engine against the REAL vLLM source of the ends of the pinned range, read from the wheels with `ast`.

The engine RUNS on vLLM's CPU build (tests/test_vllm_engine.py); this file checks what that cannot: that the
same calls exist in the CUDA releases at both ends of the pinned range. For each, the wheel (~336 MB) is
fetched once without dependencies into ~/.cache/gpg-vl/wheels (or $GPG_VL_WHEELS) and reused. What the engine
uses is read from the engine itself (its kwargs builders, and an AST scan of gpg_vl/rollout/vllm.py), so a new
call is checked without editing this file. Invariant: every `LLM` argument, `SamplingParams` field, prompt and
output field, `LLM` / engine method and keyword, worker RPC, sleep tag, launcher variable and Qwen weight-name
prefix the engine relies on exists in each checked release. A wheel that cannot be fetched FAILS the test
with pip's reason: a check that did not run is not a pass.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpg_vl.config import ModelConfig, RolloutConfig
from gpg_vl.rollout import SamplingParams
from gpg_vl.rollout import vllm as vl

ROOT = Path(__file__).resolve().parent.parent
ENGINE_SOURCE = Path(vl.__file__)
# Oldest and newest releases inside VLLM_RANGE on the registry (checked November 2026: 0.20.0 ... 0.33.0).
CHECKED = ("0.20.0", "0.33.0")
WHEELS = Path(os.environ.get("GPG_VL_WHEELS", Path.home() / ".cache" / "gpg-vl" / "wheels"))
PLATFORM_TAGS = ("manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_35_x86_64")

LLM_PY = "vllm/entrypoints/llm.py"
QWEN_MODELS = {  # file -> model class; the recipes train Qwen2-VL and Qwen2.5-VL
    "vllm/model_executor/models/qwen2_vl.py": "Qwen2VLForConditionalGeneration",
    "vllm/model_executor/models/qwen2_5_vl.py": "Qwen2_5_VLForConditionalGeneration",
}


# ---- fetching and reading the wheel ---------------------------------------------------------------------


def fetch_wheel(version: str) -> Path:
    """The cached wheel of vllm==version, downloaded (no dependencies) on first use; fails, with pip's reason, when
    that fails."""
    found = sorted(WHEELS.glob(f"vllm-{version}-*.whl"))
    if found:
        return found[0]
    WHEELS.mkdir(parents=True, exist_ok=True)
    # A Linux x86-64 wheel whatever this machine is: only its Python source is read. Releases differ in their
    # glibc tag (0.20.0: manylinux_2_35, 0.33.0: manylinux_2_28), so every tag is offered.
    platforms = [flag for tag in PLATFORM_TAGS for flag in ("--platform", tag)]
    cmd = [sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--only-binary=:all:",
           *platforms, "--python-version", "3.11", "-d", str(WHEELS), "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"could not fetch the vllm=={version} wheel into {WHEELS}: {e}")
    found = sorted(WHEELS.glob(f"vllm-{version}-*.whl"))
    if proc.returncode or not found:
        why = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if not line.startswith("WARNING")][-1:]
        pytest.fail(f"could not fetch the vllm=={version} wheel into {WHEELS}: {(why or [f'exit {proc.returncode}'])[0]}")
    return found[0]


class Source:
    """Python files of one vllm wheel, parsed on demand."""

    def __init__(self, wheel: Path, version: str):
        self.zip, self.version = zipfile.ZipFile(wheel), version

    def has(self, path: str) -> bool:
        return path in self.zip.namelist()

    def text(self, path: str) -> str:
        return self.zip.read(path).decode()

    @lru_cache(maxsize=None)
    def tree(self, path: str) -> ast.Module:
        return ast.parse(self.text(path))

    def cls(self, path: str, name: str) -> ast.ClassDef:
        for node in self.tree(path).body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
        pytest.fail(f"vllm {self.version}: no class {name} in {path}")

    def method(self, path: str, cls: str, name: str) -> ast.FunctionDef:
        for node in self.cls(path, cls).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return node
        pytest.fail(f"vllm {self.version}: {cls} in {path} has no method {name}")

    def fields(self, path: str, cls: str) -> set[str]:
        """Annotated class attributes (dataclass / TypedDict / msgspec fields), with those of same-file bases."""
        node = self.cls(path, cls)
        names = {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        local = {n.name for n in self.tree(path).body if isinstance(n, ast.ClassDef)}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in local:
                names |= self.fields(path, base.id)
        return names

    def literal(self, path: str, name: str) -> set:
        """The values of `name = Literal[...]` at module level."""
        for node in self.tree(path).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
        pytest.fail(f"vllm {self.version}: no {name} = Literal[...] in {path}")

    def class_path(self, importer: str, name: str) -> str:
        """The file that `importer` imports class `name` from (absolute `from vllm.x import name`)."""
        for node in ast.walk(self.tree(importer)):
            if isinstance(node, ast.ImportFrom) and node.module and any(a.name == name for a in node.names):
                return node.module.replace(".", "/") + ".py"
        pytest.fail(f"vllm {self.version}: {importer} does not import {name}")


@pytest.fixture(scope="module", params=CHECKED)
def src(request) -> Source:
    return Source(fetch_wheel(request.param), request.param)


def accepts(fn: ast.FunctionDef, keyword: str) -> bool:
    a = fn.args
    return keyword in {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} or a.kwarg is not None


def max_positional(fn: ast.FunctionDef) -> float:
    a = fn.args
    return float("inf") if a.vararg else len(a.posonlyargs + a.args) - 1  # minus self


def string_constants(node: ast.AST) -> set[str]:
    return {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}


# ---- what the engine uses, read from the engine ---------------------------------------------------------


def engine_tree() -> ast.Module:
    return ast.parse(ENGINE_SOURCE.read_text())


def engine_function(name: str, cls: str | None = None) -> ast.FunctionDef:
    body = engine_tree().body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    return next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)


def chain(node: ast.AST) -> list[str] | None:
    """`self.llm.llm_engine.reset_encoder_cache` -> ["llm", "llm_engine", "reset_encoder_cache"]."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    parts.reverse()
    return parts[1:] if parts[0] == "self" else parts


def engine_llm_calls() -> list[tuple[str, list[str], int]]:
    """Every call the engine makes on its `vllm.LLM` (`llm.*` / `self.llm.*`): (dotted path, keywords, #positional)."""
    calls = []
    for node in ast.walk(engine_tree()):
        if isinstance(node, ast.Call) and (path := chain(node.func)) and path[0] == "llm" and len(path) > 1:
            calls.append((".".join(path[1:]), [k.arg for k in node.keywords if k.arg], len(node.args)))
    return calls


def attributes_read(fn: ast.FunctionDef, var: str) -> set[str]:
    """Attribute names read from variable `var` in `fn` (`var.x` and `getattr(var, "x", ...)`)."""
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == var:
            names.add(node.attr)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and isinstance(node.args[0], ast.Name) and node.args[0].id == var and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
    return names


def sample_llm_kwargs(on_cpu: bool = False, **model) -> dict:
    return vl.build_llm_kwargs(
        "/m", RolloutConfig(), ModelConfig(**model), (3136, 12544), 2, not on_cpu, None, on_cpu=on_cpu, max_model_len=4096, kv_bytes=2**27,
    )


# ---- the range ------------------------------------------------------------------------------------------


def test_checked_releases_are_the_ends_of_the_pinned_range():
    from packaging.version import Version

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    lo, hi = vl.VLLM_RANGE
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra == [f"vllm>={lo},<{hi}"]  # the extra and the engine's own range agree
    oldest, newest = CHECKED
    assert Version(oldest) == Version(lo) and Version(newest) < Version(hi)
    assert all(vl.version_supported(v) for v in CHECKED)


def test_vllm_exports_what_the_engine_imports(src):
    used = {n.attr for n in ast.walk(engine_tree()) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "vllm"}
    assert {"LLM", "SamplingParams", "__version__"} <= used  # the scan sees the engine
    exported = next(n for n in src.tree("vllm/__init__.py").body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    missing = used - string_constants(exported.value)
    assert not missing, f"vllm {src.version} does not export {missing}"


# ---- LLM(...) -------------------------------------------------------------------------------------------


def test_llm_takes_every_argument_the_engine_passes(src):
    init = src.method(LLM_PY, "LLM", "__init__")
    explicit = {a.arg for a in init.args.args + init.args.kwonlyargs}
    engine_args = src.fields("vllm/engine/arg_utils.py", "EngineArgs")  # where LLM's **kwargs go
    for on_cpu in (False, True):  # the CUDA and the CPU sets of arguments
        kwargs = sample_llm_kwargs(on_cpu)
        unknown = {k for k in kwargs if k not in explicit and not (init.args.kwarg and k in engine_args)}
        assert not unknown, f"vllm {src.version}: LLM(...) has no argument {sorted(unknown)} (on_cpu={on_cpu})"


def test_llm_argument_values_are_ones_vllm_allows(src):
    dtypes = src.literal("vllm/config/model.py", "ModelDType")
    for dtype in ("auto", "bfloat16", "float16", "float32"):
        assert sample_llm_kwargs(dtype=dtype)["dtype"] in dtypes
    kwargs = sample_llm_kwargs()
    assert kwargs["logprobs_mode"] in src.literal("vllm/config/model.py", "LogprobsMode")
    assert kwargs["distributed_executor_backend"] in src.literal("vllm/config/parallel.py", "DistributedExecutorBackend")


def test_qwen_processors_read_the_pixel_budget_keys(src):
    # vLLM's Qwen2-VL processing info reads mm_processor_kwargs with mm_kwargs.get("min_pixels") ...;
    # Qwen2.5-VL's subclasses it.
    path = "vllm/model_executor/models/qwen2_vl.py"
    read = {c.args[0].value for c in ast.walk(src.tree(path)) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
            and c.func.attr == "get" and c.args and isinstance(c.args[0], ast.Constant)}
    keys = set(sample_llm_kwargs()["mm_processor_kwargs"])
    assert keys and keys <= read, f"vllm {src.version}: {path} never reads {keys - read}"
    subclass = src.cls("vllm/model_executor/models/qwen2_5_vl.py", "Qwen2_5_VLProcessingInfo")
    assert any(isinstance(b, ast.Name) and b.id == "Qwen2VLProcessingInfo" for b in subclass.bases)


# ---- sampling -------------------------------------------------------------------------------------------


def test_sampling_params_has_every_field_the_engine_sets(src):
    fields = src.fields("vllm/sampling_params.py", "SamplingParams")
    set_here = set(vl.build_sampling_kwargs(SamplingParams(n=2, seed=1), [5], [6]))
    generate = engine_function("generate", "VLLMEngine")
    set_here |= {k.arg for c in ast.walk(generate) if isinstance(c, ast.Call) and chain(c.func) == ["_sampling_params"] for k in c.keywords if k.arg}
    assert "seed" in set_here and "logit_bias" in set_here
    assert not set_here - fields, f"vllm {src.version}: SamplingParams has no field {sorted(set_here - fields)}"


def test_top_k_zero_means_no_top_k(src):
    # build_sampling_kwargs maps "no top-k" to 0; vLLM documents 0 (or -1) as "consider all tokens"
    body = src.cls("vllm/sampling_params.py", "SamplingParams").body
    i = next(i for i, n in enumerate(body) if isinstance(n, ast.AnnAssign) and n.target.id == "top_k")
    assert body[i].value.value == 0 and "Set to 0" in body[i + 1].value.value
    assert vl.build_sampling_kwargs(SamplingParams(top_k=0), [], [])["top_k"] == 0


# ---- generate(prompts) and what comes back --------------------------------------------------------------


def test_prompt_dicts_use_vllms_keys(src):
    processor = SimpleNamespace(resize=lambda m: m, render=lambda m: "<|image_pad|>Which colour?")
    from PIL import Image

    request = vl.build_requests(processor, [[{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (28, 28))}]}]])[0]
    assert not set(request) - src.fields("vllm/inputs/llm.py", "TextPrompt")
    assert not set(request["multi_modal_data"]) - src.fields("vllm/inputs/llm.py", "MultiModalDataBuiltins")


def test_outputs_have_every_field_the_engine_reads(src):
    to_rollout = engine_function("outputs_to_rollout")
    read_request, read_completion = attributes_read(to_rollout, "out"), attributes_read(to_rollout, "c")
    read_logprob = attributes_read(engine_function("_sampled_logprob"), "entry")
    assert read_request == {"outputs"} and {"token_ids", "logprobs", "finish_reason"} <= read_completion and read_logprob
    init = src.method("vllm/outputs.py", "RequestOutput", "__init__")
    assert "outputs" in {a.arg for a in init.args.args}
    assert not read_completion - src.fields("vllm/outputs.py", "CompletionOutput")
    assert not read_logprob - src.fields("vllm/logprobs.py", "Logprob")
    # finish_reason strings the engine compares against
    reasons = next(n.value for n in src.tree("vllm/v1/engine/__init__.py").body
                   if isinstance(n, ast.Assign) and n.targets[0].id == "FINISH_REASON_STRINGS")
    assert {"stop", "length"} <= string_constants(reasons)


# ---- every method the engine calls on LLM ----------------------------------------------------------------


def resolve(src: Source, dotted: str) -> ast.FunctionDef:
    """`generate` -> LLM.generate; `llm_engine.reset_encoder_cache` -> LLMEngine.reset_encoder_cache."""
    *attrs, name = dotted.split(".")
    if not attrs:
        return src.method(LLM_PY, "LLM", name)
    assert attrs == ["llm_engine"], f"the engine reaches into LLM.{'.'.join(attrs)}: add it to this test's resolver"
    init = src.method(LLM_PY, "LLM", "__init__")
    assigned = {t.attr for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Attribute)}
    assert "llm_engine" in assigned, f"vllm {src.version}: LLM no longer sets self.llm_engine"
    return src.method(src.class_path(LLM_PY, "LLMEngine"), "LLMEngine", name)


def test_every_llm_call_the_engine_makes_exists_with_its_keywords(src):
    calls = engine_llm_calls()
    found = {path for path, _, _ in calls}
    assert {"generate", "apply_model", "collective_rpc", "sleep", "wake_up", "reset_prefix_cache", "reset_mm_cache",
            "llm_engine.reset_encoder_cache"} <= found
    for path, keywords, positional in calls:
        fn = resolve(src, path)
        bad = [k for k in keywords if not accepts(fn, k)]
        assert not bad, f"vllm {src.version}: {path}() takes no {bad}"
        assert positional <= max_positional(fn), f"vllm {src.version}: {path}() takes fewer positional arguments"


# ---- weights: collective_rpc("reload_weights") on the worker, apply_model for the LM head, names ---------


def test_weights_reload_through_the_workers_reload_weights_with_the_engines_keywords(src):
    rpc = next(c for c in ast.walk(engine_function("push_weights")) if isinstance(c, ast.Call) and chain(c.func) == ["llm", "collective_rpc"])
    method = rpc.args[0].value
    keywords = {k.value for k in next(k.value for k in rpc.keywords if k.arg == "kwargs").keys}
    assert method == "reload_weights" and keywords == {"weights_iterator", "is_checkpoint_format"}
    src.method("vllm/v1/worker/gpu_worker.py", "Worker", method)  # the CUDA worker forwards it to its runner
    runner = src.method("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner", method)
    assert all(accepts(runner, k) for k in keywords), f"vllm {src.version}: GPUModelRunner.reload_weights takes {keywords}?"
    # a named RPC runs the worker's method of that name (in this process, with external_launcher)
    assert "run_method(self.driver_worker" in ast.unparse(src.method("vllm/v1/executor/uniproc_executor.py", "UniProcExecutor", "collective_rpc"))


def test_the_tied_lm_head_is_refreshed_through_vllms_own_post_load_hook(src):
    path = "vllm/model_executor/layers/vocab_parallel_embedding.py"
    src.cls(path, "ParallelLMHead")
    src.method(path, "UnquantizedEmbeddingMethod", "process_weights_after_loading")


def test_apply_model_runs_in_this_process_on_the_unwrapped_model(src):
    assert "self.llm_engine.apply_model(" in ast.unparse(src.method(LLM_PY, "LLM", "apply_model"))
    engine = ast.unparse(src.method(src.class_path(LLM_PY, "LLMEngine"), "LLMEngine", "apply_model"))
    assert "collective_rpc('apply_model'" in engine  # the worker's apply_model, by name
    base = src.method("vllm/v1/worker/worker_base.py", "WorkerBase", "apply_model")
    assert "self.get_model()" in ast.unparse(base)  # fn(self.get_model())
    assert "model_runner.get_model()" in ast.unparse(src.method("vllm/v1/worker/gpu_worker.py", "Worker", "get_model"))
    unwrap = ast.unparse(src.method("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner", "get_model"))
    assert "CUDAGraphWrapper" in unwrap  # returns the raw model, not the CUDA-graph wrapper
    # external_launcher turns V1 multiprocessing off, so the executor calls the worker directly
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in src.text("vllm/config/parallel.py")
    # in-process client -> engine core -> executor -> worker, with no serialisation of `fn` on the way
    assert "self.engine_core.collective_rpc(" in ast.unparse(src.method("vllm/v1/engine/core_client.py", "InprocClient", "collective_rpc"))
    assert "self.model_executor.collective_rpc(" in ast.unparse(src.method("vllm/v1/engine/core.py", "EngineCore", "collective_rpc"))
    rpc = ast.unparse(src.method("vllm/v1/executor/uniproc_executor.py", "UniProcExecutor", "collective_rpc"))
    assert "run_method(self.driver_worker" in rpc
    src.cls("vllm/v1/executor/uniproc_executor.py", "ExecutorWithExternalLauncher")


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_policy_weight_names_are_ones_vllms_qwen_mapper_maps(src, arch, tmp_path):
    from gpg_vl.modeling import load_policy
    from gpg_vl.tiny import make_tiny

    model, _ = load_policy(ModelConfig(name_or_path=str(make_tiny(tmp_path / arch, arch=arch))))
    names = [n for n, _ in vl.hf_to_vllm_weights(model.named_parameters())]
    path, cls = next((p, c) for p, c in QWEN_MODELS.items() if ("2_5" in p) == (arch == "qwen2_5_vl"))
    node = src.cls(path, cls)
    src.method(path, cls, "load_weights")
    mapper = next(n for n in node.body if isinstance(n, ast.Assign) and n.targets[0].id == "hf_to_vllm_mapper")
    prefixes = next(k.value for k in mapper.value.keywords if k.arg == "orig_to_new_prefix")
    known = {c.value for c in prefixes.keys}
    unmapped = [n for n in names if not n.startswith(tuple(known))]
    assert names and not unmapped, f"vllm {src.version} {cls}: no prefix maps {unmapped[:3]}"
    assert "mapper=self.hf_to_vllm_mapper" in ast.unparse(src.method(path, cls, "load_weights"))


# ---- sleep / wake, and the launcher's variables ---------------------------------------------------------


def test_sleep_level_one_keeps_weights_and_the_wake_tags_exist(src):
    wake_calls = [c for c in ast.walk(engine_tree()) if isinstance(c, ast.Call) and chain(c.func) == ["_wake"]]
    tags = set().union(*(string_constants(c) for c in wake_calls))
    assert tags == {"weights", "kv_cache"}
    executor = src.tree("vllm/v1/executor/abstract.py")
    assert tags <= string_constants(executor), f"vllm {src.version}: the executor does not track sleep tags {tags}"
    # level 1 offloads the "weights" pool to host memory (restored on wake), it does not discard it
    files = ["vllm/v1/worker/gpu_worker.py", "vllm/device_allocator/sleep_mode_backend.py"]
    offloaders = [fn for f in files if src.has(f) for fn in ast.walk(src.tree(f))
                  if isinstance(fn, ast.FunctionDef) and fn.name in ("sleep", "suspend") and "level == 1" in ast.unparse(fn)]
    assert any("weights" in string_constants(fn) and "offload_tags" in ast.unparse(fn) for fn in offloaders)


def test_external_launcher_reads_the_variables_launcher_env_sets(src, monkeypatch):
    args = src.method("vllm/v1/executor/uniproc_executor.py", "ExecutorWithExternalLauncher", "_distributed_args")
    read = {n.slice.value for n in ast.walk(args) if isinstance(n, ast.Subscript) and "environ" in ast.unparse(n.value)}
    assert read >= {"RANK", "LOCAL_RANK"} and "env://" in string_constants(args)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    import torch

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with vl.launcher_env(local_rank=0):
        present = {k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    # vLLM's own reads, plus what torch's env:// rendezvous needs
    assert read | {"WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= present
