#!/usr/bin/env python
"""Check moetrim's REAM (plan: moetrim.plan.ream; merge: moetrim.apply.ream) against the REAM authors' own
merging code, step by step, on a bundled model.

It is not vendored (their code stays theirs), so give a clone of SamsungSAILMontreal/ream (its data/*.pt
calibration batches are Git LFS objects this check does not need):

    git clone https://github.com/SamsungSAILMontreal/ream /tmp/ream
    python scripts/check_ream_against_authors.py /tmp/ream [--model longtail] [--ratio 0.25]
        [--merging logits+weights|weights] [--group-size 16] [--sequential] [--raw-router-weights]

What runs. The calibration texts of the model's trained domains (`calibration_texts(domains, n_per_domain,
seed=0)`) are cut into seq_len-token chunks (`moetrim.data.text.token_chunks`) and the short last chunk is
dropped, so that both sides see the same N x S tokens with no padding (their statistics count every
position, masked or not). Ours: `calibrate(model, chunks, seq_len, batch_size, seed=0, fisher=False)`,
`make_plan(model, profile, granularity="ream", ratio)` (k = max(top_k, floor(E (1 - ratio))) centroids per
layer, groups of at most 16), `apply_plan` on a copy. Theirs, on another copy of the unmerged model:
`ream.Merger.__init__` and `Merger.fit()` unchanged, with merge_size = k, grouping "ream", saliency "reap",
merging as --merging (their default "logits+weights"), group_size = --group-size, use_gate_output and
gated_sim on (their defaults), batch_size as ours, sequential off unless --sequential (their default is on:
layer l's statistics are re-collected after layers < l are merged; ours are one pass over the unmerged
model). Their calibration batch is our N chunks ({'input_ids': [N, S], 'attention_mask': ones}), written
as the data/<name>_b<N>_seq<S>_<tokenizer>_seed0.pt file `__init__` loads, in a temporary folder; numpy's
global seed is set to 0 first (their `run_all_experts` samples activations with np.random). Everything
runs on the CPU (their code picks 'cpu' when CUDA is absent).

Patches, for the length of `fit()` only. Their `moe_utils.get_moe_input` calls transformers' causal-mask
builders with transformers 4's keywords (input_embeds, cache_position, past_key_values); transformers 5
names them inputs_embeds / cache, so both names in their module are wrapped to translate. It also picks
`create_sliding_window_causal_mask` whenever `config.sliding_window is not None`: the bundled Qwen2-MoE has
sliding_window = 0 with every layer full attention, and a window of 0 masks every position (the MoE inputs
then differ from the model's by O(1)), so the wrapper builds the full causal mask whenever no layer is a
sliding-attention layer, as the model itself does. `datasets` (imported by their data/calibration_data.py,
unused here) gets an empty stand-in when missing. Nothing of theirs is recomputed here: the locals of
`ream.ream.pseudo_group` (saliency after their zero-lifting, expert_logits = their m, gate_logits, the
distance matrix `d`, centroid_inds, cluster_labels) and of `Merger._merge` (group, the Hungarian
permutations `perm_lst`) are read when each call returns (sys.setprofile, set around the call only;
`_merge` is wrapped on the instance, `pseudo_group` in ream.merger's namespace).

Per MoE layer, one line:
  (1) sal: max |theirs - ours| / max ours of the expert saliency (ours: moetrim.plan.ream.saliency);
  (2) gram: max |G_theirs - G_ours| / max |G| of the router logits' Gram (their gate_logits against our
      profile's logit_gram: the same tokens and inputs); dist: max |theirs - ours| of the distance matrix
      (moetrim.plan.ream.distances); `=stats` the same with our formula fed their m and their Gram;
  (3) whether both pick the same centroids and the same member sets; `=alg` whether
      moetrim.plan.ream.groups fed their saliency and their d returns their groups;
  (4) perm: for every (centroid, member) pair their fit merged, how many of the member's neurons our
      moetrim.apply.ream.match (on our neuron_features) maps to the same centroid neuron as theirs, and
      how many members get the very same permutation; `=feat` their `Merger._merge`, run again with
      merging = "weights" on our group, our saliency as weights and our neuron_features: the members whose
      permutation differs from our match (their Hungarian on our features);
  (5) whether both routers keep the same rows, whether the centroids both leave alone are equal, and
      max |theirs - ours| / max |W| over the merged experts of both fit/apply results (gate_up, down);
      `=feat` the same between the `_merge` above and our merged_group.
Exit 1 when a like-for-like check (`=stats`, `=alg`, `=feat`) disagrees beyond --tol (1e-5).

The direct comparisons differ where the two define things differently (moetrim.plan.ream and
moetrim.apply.ream docstrings): saliency and grouping agree to float32 on a model that does not renormalise
its top-k weights (Qwen2-MoE); on one that does (Qwen3-MoE), their saliency takes the raw softmax p where
ours takes the renormalised g (--raw-router-weights turns renormalisation off in the model both run: then
they agree). Their m is the mean over every token of p*y for every expert, ours the sum over routed
tokens of g*y, so d differs (the Gram and the formula agree). With C = 16, E <= 32 and k = 75% of E, the
most salient centroid absorbs every non-centroid, so the groups follow from the centroids alone (--group-
size 2 makes d decide). Neuron permutations differ: their cost adds the distance between neurons'
activations sampled on a different random shuffle of the tokens for each expert (--merging weights drops
it), and their PCA features are torch.pca_lowrank(q=64, niter=2) (randomised) coordinates scaled by the
singular values, x V diag(s), where ours are exact x V.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch


@contextlib.contextmanager
def _locals_on_return(fn, sink: list):
    """While active, every return of `fn`'s code object appends a copy of its locals to `sink`."""
    code = getattr(fn, "__wrapped__", fn).__code__
    previous = sys.getprofile()

    def profiler(frame, event, arg):
        if event == "return" and frame.f_code is code:
            sink.append(dict(frame.f_locals))

    sys.setprofile(profiler)
    try:
        yield
    finally:
        sys.setprofile(previous)


def _recording(fn, sink: list, tag=None):
    """`fn` whose every call appends its locals at return to `sink` (with `tag()` under "_tag")."""

    def call(*args, **kwargs):
        with _locals_on_return(fn, sink):
            out = fn(*args, **kwargs)
        if tag is not None:
            sink[-1]["_tag"] = tag()
        return out

    return call


def _mask_adapter(build, causal):
    """Their transformers-4 call of a causal-mask builder, translated to transformers 5's keywords. `build` is
    the builder their module names; `causal` the full causal one, used instead of a sliding-window builder
    when none of the model's layers is a sliding-attention layer (as the model itself does)."""

    def call(config, input_embeds, attention_mask, cache_position=None, past_key_values=None, position_ids=None):
        fn = build if "sliding_attention" in (getattr(config, "layer_types", None) or []) else causal
        return fn(config=config, inputs_embeds=input_embeds, attention_mask=attention_mask, cache=past_key_values,
                  position_ids=position_ids)

    return call


@contextlib.contextmanager
def _patched(module, **names):
    old = {k: getattr(module, k) for k in names}
    for k, v in names.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


class _Stats:
    """A profile stand-in for moetrim.plan.ream.distances: their output signature m [E, H] and the Gram of
    their router logits [E, E]."""

    def __init__(self, m: torch.Tensor, gram: torch.Tensor):
        self.stats = {"gated_out_sum": m, "logit_gram": gram}

    def get(self, layer, name):
        return self.stats[name]


def _group_sets(groups) -> dict[int, frozenset]:
    return {int(g[0]): frozenset(int(e) for e in g[1:]) for g in groups}


def _their_groups(labels: np.ndarray, centroids: np.ndarray) -> list[list[int]]:
    return [[int(c), *[int(e) for e in np.where(labels == labels[c])[0] if e != c]] for c in centroids]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clone", type=Path, help="a clone of github.com/SamsungSAILMontreal/ream")
    ap.add_argument("--model", default="longtail", help="bundled model (reference or longtail)")
    ap.add_argument("--ratio", type=float, default=0.25, help="share of each layer's experts merged away")
    ap.add_argument("--merging", default="logits+weights", choices=["logits+weights", "weights"],
                    help="their Merger's merging for fit() (their default logits+weights; ours matches on weights only)")
    ap.add_argument("--group-size", type=int, default=16, help="REAM's C for both (make_plan uses 16; other values regroup ours)")
    ap.add_argument("--sequential", action="store_true", help="their default: re-collect each layer after merging the earlier ones")
    ap.add_argument("--raw-router-weights", action="store_true",
                    help="diagnostic: turn the routers' top-k renormalisation off in the model both sides run")
    ap.add_argument("--n-per-domain", type=int, default=8, help="calibration texts per trained domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-5, help="largest difference accepted in the like-for-like checks")
    args = ap.parse_args(argv)
    if not (args.clone / "ream" / "merger.py").is_file():
        ap.error(f"{args.clone} has no ream/merger.py: give a clone of SamsungSAILMontreal/ream")
    try:
        import datasets  # noqa: F401  (their data/calibration_data.py imports it; unused here)
    except ImportError:
        stub = types.ModuleType("datasets")
        stub.load_dataset = None
        sys.modules["datasets"] = stub
    sys.path.insert(0, str(args.clone.resolve()))
    import ream as theirs
    import ream.merger
    import ream.moe_utils
    import ream.ream

    import moetrim
    from moetrim.apply.ream import match, merged_group, neuron_features
    from moetrim.assets import BUNDLED, bundled_name, trained_domains
    from moetrim.calibrate import calibrate
    from moetrim.data.tasks import DOMAINS, calibration_texts
    from moetrim.data.text import token_chunks
    from moetrim.model.view import find_moe_layers
    from moetrim.plan import make_plan
    from moetrim.plan import ream as ours

    key = args.model if args.model in BUNDLED else bundled_name(args.model)
    if key is None:
        ap.error(f"--model: {args.model!r} is not a bundled model; choose one of {', '.join(BUNDLED)}")
    model, tok = moetrim.reference_model(key)
    model.float().eval()
    if args.raw_router_weights:
        model.config.norm_topk_prob = False
        for layer in find_moe_layers(model):
            layer.block.gate.norm_topk_prob = False

    texts = calibration_texts(trained_domains(BUNDLED[key]) or list(DOMAINS), n_per_domain=args.n_per_domain, seed=0)
    chunks = token_chunks(texts, tok, seq_len=args.seq_len)
    full = [c for c in chunks if c.numel() == args.seq_len]
    if not full:
        ap.error(f"no calibration chunk of {args.seq_len} tokens: lower --seq-len or raise --n-per-domain")
    ids = torch.stack(full)
    N, S = ids.shape
    profile = calibrate(model, full, tokenizer=tok, seq_len=args.seq_len, batch_size=args.batch_size, seed=0, fisher=False)
    plan = make_plan(model, profile, granularity="ream", ratio=args.ratio, seed=0)
    layers = find_moe_layers(model)
    keep = len(plan.layers[0].groups)
    if args.group_size != ours.GROUP_SIZE:  # regroup ours with the other C (make_plan always uses 16)
        import dataclasses

        plan.layers = [dataclasses.replace(lp, groups=ours.groups(ours.saliency(profile, lp.layer), ours.distances(profile, lp.layer), keep,
                                                                 args.group_size)) for lp in plan.layers]
    feats = {l.index: neuron_features(l) for l in layers}
    sal = {l.index: ours.saliency(profile, l.index) for l in layers}
    dist = {l.index: ours.distances(profile, l.index) for l in layers}
    mine = copy.deepcopy(model)
    moetrim.apply_plan(mine, plan, profile)

    # -- theirs: Merger.__init__ and fit() on a copy of the unmerged model ------------------------------------
    their_model = copy.deepcopy(model)
    groupings, merges, log = [], [], io.StringIO()
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (Path(tmp) / "data").mkdir()
        torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, Path(tmp) / "data" / f"moetrim_b{N}_seq{S}_moetrim_seed0.pt")
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                os.chdir(tmp)
                merger = theirs.Merger(their_model, merge_size=keep, grouping="ream", merging=args.merging, saliency="reap",
                                       dataset="moetrim", tokenizer_name="moetrim", batch_size=args.batch_size,
                                       group_size=args.group_size, sequential=args.sequential, use_gate_output=True, gated_sim=True,
                                       calibration_data_size=N, calibration_data_seq_len=S, seed=0, verbose=False)
                os.chdir(here)
                merger._merge = _recording(merger._merge, merges, tag=lambda: len(groupings) - 1)  # on the instance: their class is untouched
                np.random.seed(0)
                causal = ream.moe_utils.create_causal_mask
                with _patched(ream.moe_utils, create_causal_mask=_mask_adapter(causal, causal),
                              create_sliding_window_causal_mask=_mask_adapter(ream.moe_utils.create_sliding_window_causal_mask, causal)), \
                        _patched(ream.merger, pseudo_group=_recording(ream.ream.pseudo_group, groupings)):
                    merger.fit()
        except Exception:
            os.chdir(here)
            print(log.getvalue()[-4000:], file=sys.stderr)
            raise
    assert len(groupings) == len(layers), (len(groupings), len(layers))

    print(f"{args.model}: {N} x {S} calibration tokens ({len(chunks) - N} short chunk(s) dropped); E={layers[0].num_experts}, "
          f"top-{layers[0].top_k}, k={keep}, C={args.group_size}; their merging {args.merging!r}, "
          f"sequential {args.sequential}")
    their_layers = find_moe_layers(their_model)
    mine_layers = find_moe_layers(mine)
    bad = 0
    torch.set_grad_enabled(False)
    for i, layer in enumerate(layers):
        L = layer.index
        g = groupings[i]
        # (1) saliency
        t_sal = torch.as_tensor(np.asarray(g["saliency"]), dtype=torch.float64)
        sal_diff = float((t_sal - sal[L]).abs().max() / sal[L].abs().max())
        # (2) distances
        t_d = torch.as_tensor(g["d"], dtype=torch.float64)
        d_diff = float((t_d - dist[L]).abs().max())
        m = g["expert_logits"].reshape(layer.num_experts, -1).double()
        logits = g["gate_logits"].double()
        gram = profile.get(L, "logit_gram").double()
        gram_diff = float((logits.T @ logits - gram).abs().max() / gram.abs().max())
        d_alg = float((t_d - ours.distances(_Stats(m, logits.T @ logits), L)).abs().max())
        # (3) centroids and groups
        t_groups = _their_groups(g["cluster_labels"], g["centroid_inds"])
        o_groups = next(lp.groups for lp in plan.layers if lp.layer == L)
        same_centroids = {x[0] for x in t_groups} == {x[0] for x in o_groups}
        same_groups = _group_sets(t_groups) == _group_sets(o_groups)
        alg = _group_sets(ours.groups(t_sal, t_d, keep, args.group_size)) == _group_sets(t_groups)
        # (4) permutations: every (centroid, member) pair their fit merged, against our match on our features
        calls = [c for c in merges if c["_tag"] == i]
        same_pos = total_pos = same_members = n_members = 0
        for c in calls:
            grp = [int(e) for e in c["group"]]
            for j, e in enumerate(grp[1:]):
                o_perm = match(feats[L][grp[0]], feats[L][e]).numpy()
                same_pos += int((np.asarray(c["perm_lst"][j]) == o_perm).sum())
                total_pos += o_perm.size
                same_members += bool((np.asarray(c["perm_lst"][j]) == o_perm).all())
                n_members += 1
        # (4, 5) =feat: their _merge (merging="weights") on our groups, weights and neuron features
        perm_off = 0
        merge_off = 0.0
        scale = max(float(layer.block.experts.gate_up_proj.detach().abs().max()), float(layer.block.experts.down_proj.detach().abs().max()))
        merger.merging, merging = "weights", merger.merging
        try:
            for grp in (x for x in o_groups if len(x) > 1):
                sink = []
                out = _recording(theirs.Merger._merge.__get__(merger), sink)(
                    experts=layer.block.experts, group=np.asarray(grp), saliency=sal[L].numpy(), expert_weights=feats[L], expert_act=None)
                gate, up, down = merged_group(layer, grp, [float(sal[L][e]) for e in grp], feats[L])
                for j, e in enumerate(grp[1:]):
                    perm_off += not np.array_equal(np.asarray(sink[-1]["perm_lst"][j]), match(feats[L][grp[0]], feats[L][e]).numpy())
                merge_off = max(merge_off, float((out.gate_up_proj.detach().double() - torch.cat([gate, up])).abs().max()) / scale,
                                float((out.down_proj.detach().double() - down).abs().max()) / scale)
        finally:
            merger.merging = merging
        # (5) the merged layers: their fit's model against ours
        t_block, o_block = their_layers[i].block, mine_layers[i].block
        t_kept = sorted(int(c) for c in g["centroid_inds"])
        o_kept = sorted(x[0] for x in o_groups)
        same_router = t_kept == o_kept and torch.equal(their_layers[i].router_weight, mine_layers[i].router_weight)
        merged_off, singles_equal = 0.0, True
        o_sizes = {x[0]: len(x) for x in o_groups}
        t_sizes = {x[0]: len(x) for x in t_groups}
        for cen in set(t_kept) & set(o_kept):
            a, b = t_kept.index(cen), o_kept.index(cen)
            diff = max(float((t_block.experts.gate_up_proj[a] - o_block.experts.gate_up_proj[b]).abs().max()),
                       float((t_block.experts.down_proj[a] - o_block.experts.down_proj[b]).abs().max())) / scale
            if o_sizes[cen] == t_sizes[cen] == 1:
                singles_equal &= diff == 0
            else:
                merged_off = max(merged_off, diff)
        bad += d_alg > args.tol or not alg or perm_off > 0 or merge_off > args.tol
        print(f"layer {L}: (1) sal {sal_diff:.1e}; (2) gram {gram_diff:.0e}, dist {d_diff:.1e} (=stats {d_alg:.0e}); (3) centroids same {same_centroids}, "
              f"groups same {same_groups} (=alg {alg}); (4) perm {same_pos}/{total_pos} neurons, {same_members}/{n_members} members same "
              f"(=feat {perm_off} differ); (5) router same {same_router}, singletons equal {singles_equal}, merged {merged_off:.1e} "
              f"(=feat {merge_off:.0e})")
    print(f"like-for-like checks (=stats, =alg, =feat): {'all agree' if not bad else f'{bad} layer(s) disagree'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
