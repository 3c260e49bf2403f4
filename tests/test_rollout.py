"""The HF rollout engine, on both paths (shared prompt prefix and per-row `generate`): group layout,
EOS-inclusive masks, suppressed vision tokens, log-probs that match a teacher-forced forward (the M-RoPE
positions of generation and training line up), identical greedy texts, and no vocabulary-sized buffers."""

import copy

import pytest
import torch

from gpg_vl.config import ModelConfig
from gpg_vl.logprobs import compute_token_logprobs
from gpg_vl.modeling import load_policy
from gpg_vl.rollout import SamplingParams, make_engine
from gpg_vl.config import RolloutConfig
from gpg_vl.images import resize_messages
from gpg_vl.registry import get_task
from gpg_vl.rollout.hf import HFEngine


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), min_pixels=3136, max_pixels=12544)
    model, processor = load_policy(cfg)
    engine = make_engine("hf", model, processor, RolloutConfig(batch_size=5), cfg)
    task = get_task("shapes")
    prompts = [task.messages(e) for e in task.load("synthetic:3", "train")]
    # different image sizes in one batch exercise left padding
    prompts[1][0]["content"][0]["image"] = prompts[1][0]["content"][0]["image"].resize((60, 90))
    return model, processor, engine, prompts


@pytest.fixture(params=["shared", "per_row"])
def engines(request, setup):
    """The setup with the engine on one path: shared prompt prefix (default) or per-row `generate`."""
    model, processor, engine, prompts = setup
    return model, processor, HFEngine(model, processor, batch_size=5, share_prefix=request.param == "shared"), prompts


def test_groups_masks_and_suppressed_tokens(engines):
    model, processor, engine, prompts = engines
    r = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=16, seed=0))
    assert r.prompt_indices == [0] * 4 + [1] * 4 + [2] * 4
    assert r.completion_ids.shape[0] == 12 and r.logprobs.shape == r.response_mask.shape
    eos = set(processor.eos_token_ids)
    for ids, mask, finish in zip(r.completion_ids, r.response_mask, r.finish_reasons):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix mask
        if finish == "stop":
            assert int(ids[n - 1]) in eos  # ... that ends at and includes EOS
        else:
            assert n == 16
    vision = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    assert not any(int(t) in vision for t in r.completion_ids[r.response_mask.bool()])
    assert (r.logprobs[r.response_mask == 0] == 0).all() and (r.logprobs[r.response_mask.bool()] <= 0).all()


def test_sampled_logprobs_match_teacher_forcing(engines):
    model, processor, engine, prompts = engines
    for temperature in (1.0, 0.7):
        r = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=12, temperature=temperature, seed=1))
        batch = [resize_messages(prompts[i], 3136, 12544) for i in r.prompt_indices]
        with torch.no_grad():
            forward = compute_token_logprobs(model, processor(batch), r.completion_ids, r.response_mask, temperature, processor.suppressed_token_ids)
        torch.testing.assert_close(forward, r.logprobs, atol=1e-4, rtol=1e-4)


def test_seed_reproduces_and_greedy_is_deterministic(engines):
    _, _, engine, prompts = engines
    a = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=5)).texts
    b = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=5)).texts
    assert a == b
    g1 = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=8, seed=1)).texts
    g2 = engine.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=8, seed=2)).texts
    assert g1 == g2


def test_unknown_engine_lists_valid_ones(setup):
    model, processor, _, _ = setup
    with pytest.raises(KeyError, match="hf, vllm"):
        make_engine("sglang", model, processor, RolloutConfig(), ModelConfig())


def test_shared_prefix_greedy_texts_equal_generate(setup):
    model, processor, _, prompts = setup
    # the random tiny model greedily repeats one token; larger weights make texts differ per prompt and step,
    # so a wrong position or a wrong cache row changes them
    model = _sharpened(model)
    greedy = SamplingParams(n=3, temperature=0, max_new_tokens=12)
    shared = HFEngine(model, processor, batch_size=4, share_prefix=True).generate(prompts, greedy)
    per_row = HFEngine(model, processor, batch_size=4, share_prefix=False).generate(prompts, greedy)
    assert len(set(shared.texts)) == 3  # one text per prompt, different between prompts
    assert shared.texts == per_row.texts and shared.prompt_indices == per_row.prompt_indices
    assert torch.equal(shared.completion_ids, per_row.completion_ids)
    torch.testing.assert_close(shared.logprobs, per_row.logprobs, atol=1e-5, rtol=1e-5)


def test_no_vocabulary_sized_buffers_are_requested(setup, monkeypatch):
    # generate must not be asked for per-step score/logit rows ([N, L, V] in all); the shared path never calls it
    model, processor, _, prompts = setup
    calls = []
    real = model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    params = SamplingParams(n=2, max_new_tokens=6, seed=0)
    HFEngine(model, processor, share_prefix=False).generate(prompts, params)
    assert calls and not any(k.get(flag) for k in calls for flag in ("output_scores", "output_logits"))
    calls.clear()
    r = HFEngine(model, processor, share_prefix=True).generate(prompts, params)
    assert not calls and r.logprobs.shape == r.completion_ids.shape


# --- the decode loops (gpg_vl.decode): static cache and compiled step against the dynamic reference ---------


def _sharpened(model):
    """A copy with larger random weights: greedy texts then differ per prompt and step."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def arch_setup(request, tmp_path_factory, setup):
    from gpg_vl.tiny import make_tiny

    folder = make_tiny(tmp_path_factory.mktemp(request.param) / "m", arch=request.param, seed=0)
    cfg = ModelConfig(name_or_path=str(folder), min_pixels=3136, max_pixels=12544)
    model, processor = load_policy(cfg)
    return _sharpened(model), processor, setup[3]


def test_static_decode_greedy_equals_dynamic_and_generate(arch_setup):
    # the attention over a pre-allocated cache reduces over all its slots (the unused ones masked), so logits
    # differ from the dynamic cache's in the last bits (measured <= 3e-7): texts and tokens equal, log-probs close
    model, processor, prompts = arch_setup
    greedy = SamplingParams(n=3, temperature=0, max_new_tokens=12)
    static = HFEngine(model, processor, batch_size=6, decode="static").generate(prompts, greedy)
    dynamic = HFEngine(model, processor, batch_size=6, decode="dynamic").generate(prompts, greedy)
    per_row = HFEngine(model, processor, batch_size=6, share_prefix=False).generate(prompts, greedy)
    assert len(set(static.texts)) == 3
    for other in (dynamic, per_row):
        assert static.texts == other.texts and torch.equal(static.completion_ids, other.completion_ids)
        torch.testing.assert_close(static.logprobs, other.logprobs, atol=1e-5, rtol=1e-5)


def test_static_decode_same_seed_same_samples(arch_setup):
    # log-probs within 1e-4: the sharpened weights give large logits, whose last-bit differences (see above)
    # reached 3e-5 in a log-prob on Qwen2.5-VL; the draws themselves are identical
    model, processor, prompts = arch_setup
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 20, 0.9)):
        params = SamplingParams(n=4, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=16, seed=3)
        static = HFEngine(model, processor, batch_size=8, decode="static").generate(prompts, params)
        dynamic = HFEngine(model, processor, batch_size=8, decode="dynamic").generate(prompts, params)
        assert static.texts == dynamic.texts and torch.equal(static.completion_ids, dynamic.completion_ids)
        assert torch.equal(static.response_mask, dynamic.response_mask)
        torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-4, rtol=1e-5)


def test_packed_linears_pack_every_decoder_linear_and_give_their_forward_back(arch_setup, monkeypatch):
    import gpg_vl.decode as decode

    model, _, _ = arch_setup
    monkeypatch.setattr(decode, "PACK_MIN_WEIGHTS", 0)  # tiny's layers are below the size that pays
    linears = [m for m in model.get_decoder().modules() if type(m) is torch.nn.Linear]
    x = torch.randn(6, 1, linears[0].in_features)
    with pytest.raises(RuntimeError, match="inside"):  # an error in the block still gives the forwards back
        with decode.packed_linears(model, 6) as packed:
            assert packed == len(linears) > 0 and all("forward" in m.__dict__ for m in linears)
            torch.testing.assert_close(linears[0](x), torch.nn.functional.linear(x, linears[0].weight, linears[0].bias))
            raise RuntimeError("inside")
    assert not any("forward" in m.__dict__ or decode.PACKED in m.__dict__ for m in linears)


def test_static_decode_with_every_linear_packed_equals_dynamic(arch_setup, monkeypatch):
    # the packed product sums in another order than the plain GEMM: texts and draws equal, log-probs close
    import gpg_vl.decode as decode

    model, processor, prompts = arch_setup
    monkeypatch.setattr(decode, "PACK_MIN_WEIGHTS", 0)
    calls = []
    plain = decode._packed_forward
    monkeypatch.setattr(decode, "_packed_forward", lambda *a: calls.append(1) or plain(*a))
    for params in (SamplingParams(n=3, temperature=0, max_new_tokens=12), SamplingParams(n=4, max_new_tokens=16, seed=3)):
        static = HFEngine(model, processor, batch_size=8, decode="static").generate(prompts, params)
        dynamic = HFEngine(model, processor, batch_size=8, decode="dynamic").generate(prompts, params)
        assert static.texts == dynamic.texts and torch.equal(static.completion_ids, dynamic.completion_ids)
        torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-4, rtol=1e-5)
    assert calls, "the static loop did not decode through packed weights"


def test_static_decode_falls_back_to_dynamic_where_transformers_would_copy_the_cache(setup, monkeypatch):
    # transformers before 5.23 has no pack_gqa: its sdpa copies every slot of the static cache per step for
    # grouped-query attention (tiny: 4 heads, 2 KV heads). Where group attention reads the cache instead (CPU,
    # float32) the static loop stays; elsewhere (a GPU, bf16, sharded weights) the engine decodes
    # dynamically, and says so once
    import transformers
    from packaging.version import Version

    import gpg_vl.decode as decode
    import gpg_vl.rollout.hf as hf

    model, processor, _, prompts = setup
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=6)
    assert decode.sdpa_packs_gqa() == (Version(transformers.__version__) >= Version("5.23"))
    if decode.sdpa_packs_gqa():
        assert HFEngine(model, processor, decode="static")._decode_mode(lockstep=False) == "static"
    monkeypatch.setattr(decode, "sdpa_packs_gqa", lambda: False)  # as transformers 5.19 (vLLM's environment)
    assert HFEngine(model, processor, decode="static")._decode_mode(lockstep=False) == "static"  # group attention
    monkeypatch.setattr(hf, "group_decode_applies", lambda model: False)  # as on a GPU
    engine = HFEngine(model, processor, decode="static")
    with pytest.warns(UserWarning, match="decoding with rollout.decode=dynamic"):
        fallback = engine.generate(prompts, greedy)
        assert engine._decode_mode(lockstep=False) == "dynamic"
    dynamic = HFEngine(model, processor, decode="dynamic").generate(prompts, greedy)
    assert fallback.texts == dynamic.texts
    torch.testing.assert_close(fallback.logprobs, dynamic.logprobs, atol=1e-5, rtol=1e-5)  # tiny packs no weight


def test_static_decode_on_small_20m_and_the_preset_families(tmp_path):
    # the built-in presets as `gpg-vl` builds them: small-20m's wider layers and the other families' tiny
    from gpg_vl.kit import build_builtin

    task = get_task("shapes")
    prompts = [task.messages(e) for e in task.load("synthetic:2", "train")]
    for preset in ("small-20m", "tiny-qwen2_5_vl", "tiny-qwen3_vl"):
        cfg = ModelConfig(name_or_path=build_builtin(f"builtin:{preset}"), min_pixels=3136, max_pixels=12544)
        model, processor = load_policy(cfg)
        params = SamplingParams(n=3, max_new_tokens=10, seed=7)
        static = HFEngine(model, processor, decode="static").generate(prompts, params)
        dynamic = HFEngine(model, processor, decode="dynamic").generate(prompts, params)
        assert static.texts == dynamic.texts, preset
        torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-5, rtol=1e-5)


def test_lockstep_rank_keeps_stepping_while_another_runs(setup, monkeypatch):
    # sharded weights: a rank whose rows all ended keeps calling the model (padding) while any rank runs;
    # here the "other rank" runs to max_new_tokens, so every row pads after its EOS and nothing else changes
    import gpg_vl.rollout.hf as hf

    model, processor, _, prompts = setup
    params = SamplingParams(n=2, max_new_tokens=10, seed=4)
    for decode in ("dynamic", "static"):
        alone = HFEngine(model, processor, decode=decode).generate(prompts, params)
        asked = []
        monkeypatch.setattr(hf, "needs_lockstep", lambda m: True)
        monkeypatch.setattr(hf, "any_rank", lambda flag, device: asked.append(flag) or True)
        locked = HFEngine(model, processor, decode=decode).generate(prompts, params)
        monkeypatch.undo()
        assert len(asked) == 10 and locked.completion_ids.shape[1] == 10
        L = alone.completion_ids.shape[1]
        assert torch.equal(locked.completion_ids[:, :L], alone.completion_ids)
        assert (locked.completion_ids[:, L:] == processor.pad_token_id).all()
        assert torch.equal(locked.response_mask[:, :L], alone.response_mask) and not locked.response_mask[:, L:].any()
        torch.testing.assert_close(locked.logprobs[:, :L], alone.logprobs, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("grouped", [True, False], ids=["group-attention", "full-cache"])
def test_compiled_decode_equals_static(setup, grouped, monkeypatch):
    # torch.compile of the step (default mode on the CPU); sampling stays outside, so the same seed draws the
    # same tokens; inductor's fused kernels round differently from eager, hence a tolerance on the log-probs.
    # Both caches: group attention over the completions' own cache (the CPU in float32), and the full static
    # cache with sdpa that a GPU (CUDA graphs), bf16 or a sliding-window model decodes over
    import gpg_vl.rollout.hf as hf

    if not grouped:
        monkeypatch.setattr(hf, "group_decode_applies", lambda model: False)
    model, processor, _, prompts = setup
    model = _sharpened(model)
    static = HFEngine(model, processor, batch_size=6, decode="static")
    compiled = HFEngine(model, processor, batch_size=6, decode="compiled")
    for params in (SamplingParams(n=3, temperature=0, max_new_tokens=10), SamplingParams(n=3, max_new_tokens=10, seed=2)):
        a, b = static.generate(prompts, params), compiled.generate(prompts, params)
        assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decode_on_the_cpu_runs_packed_weights_and_group_attention_in_a_graph_kept_across_weight_updates(setup, monkeypatch):
    # on the CPU in float32 the compiled step traces the static loop's packed products and group attention; the
    # packed copies are graph inputs, not constants: after the weights change in place (as an optimizer step
    # changes them) the next rollout reuses the graph, and decodes with the new weights
    import gpg_vl.decode as decode
    import gpg_vl.group_attention as ga
    from torch._dynamo.utils import counters
    from transformers import AttentionInterface

    _, processor, _, prompts = setup
    model = _sharpened(setup[0])
    monkeypatch.setattr(decode, "PACK_MIN_WEIGHTS", 0)  # tiny's layers are below the size that pays
    graphs = []  # what dynamo hands inductor: the traced step
    compile = torch.compile

    def recording_compile(fn, mode=None):
        from torch._inductor.compile_fx import compile_fx

        return compile(fn, backend=lambda gm, inputs: graphs.append(gm) or compile_fx(gm, inputs))

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    counters.clear()
    static = HFEngine(model, processor, batch_size=9, decode="static")
    compiled = HFEngine(model, processor, batch_size=9, decode="compiled")  # the 3 prompts in one call: one shape
    sampled = SamplingParams(n=3, max_new_tokens=10, seed=2)
    before = compiled.generate(prompts, sampled)
    assert before.texts == static.generate(prompts, sampled).texts
    layers = model.config.get_text_config().num_hidden_layers
    targets = [str(node.target) for node in graphs[0].graph.nodes] if len(graphs) == 1 else []
    assert len(graphs) == 1 and counters["stats"]["unique_graphs"] == 1
    assert sum("gpg_vl.packed_linear" in t for t in targets) == 7 * layers  # q k v o gate up down, packed
    assert sum("softmax" in t for t in targets) == layers and not any("scaled_dot_product" in t for t in targets)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.2)
    for params in (sampled, SamplingParams(n=3, temperature=0, max_new_tokens=10)):
        a, b = static.generate(prompts, params), compiled.generate(prompts, params)
        assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    assert not torch.equal(b.completion_ids, before.completion_ids) or not torch.allclose(a.logprobs, before.logprobs)
    assert len(graphs) == 1  # no recompile: the one graph read the new packed weights


def test_unknown_decode_mode_lists_valid_ones(setup):
    model, processor, _, _ = setup
    with pytest.raises(ValueError, match="dynamic, static, compiled"):
        HFEngine(model, processor, decode="graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_static(setup):
    # on CUDA `compiled` is torch.compile(mode="reduce-overhead"): the step replays CUDA graphs on the cache it
    # keeps between rollouts of one shape; the second rollout of each pair replays on the refilled cache
    _, processor, _, prompts = setup
    model = _sharpened(setup[0]).cuda()
    static = HFEngine(model, processor, batch_size=6, decode="static")
    compiled = HFEngine(model, processor, batch_size=6, decode="compiled")
    for params in (SamplingParams(n=3, temperature=0, max_new_tokens=10), SamplingParams(n=3, max_new_tokens=10, seed=2)) * 2:
        a, b = static.generate(prompts, params), compiled.generate(prompts, params)
        assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)
