"""New users from a few of their pairs (beyond the paper), and a look at the learned users.

    python adapt.py RUN_DIR --user NAME --data their_pairs.jsonl          # fit NAME's row, save it into the run
    python adapt.py RUN_DIR --user NAME --data F --out NEW_RUN            # the same into a copy; RUN_DIR unchanged
    python adapt.py RUN_DIR --user NAME --data their_pairs.jsonl --curve  # held-out accuracy after 1, 4, 16, 64
    python -m examples.toy --curve RUN_DIR          # the same for a fresh user of the built-in toy task
    python adapt.py users RUN_DIR                   # registry, cluster weights, nearest users

A new user is served e_0 until they have a row; `adapt` appends one row to the user model, starting at
e_0, and fits it with the run's own objective (alpha = 1) while the LM and every other row stay frozen.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import data
import prlhf
import runs
from eval import accuracy_table, score_pairs
from runs import (check_run_dir, common_flags, load_reference, online_reference, open_run, pair_collate, read_data,
                  tokenize)
from cache import reference_cache
from export import replace_directory
import report
from report import error_bars, import_pyplot, save_figure, user_vectors


def add_user(user_model, registry: prlhf.UserRegistry, name: str):
    """A copy of the user model and registry with one more row, N + 1, for `name`, starting at e_0.

    The new user was unseen until now, so e_0 is what they were served; fitting starts there.
    Individual model with e_i = e_0 + o_i: o_new = 0 (with e_i = o_i: o_new = e_0). Cluster model:
    w_new = w_0, so softmax(w_new) mixes the clusters as the generic user does. Existing rows keep
    their numbers (the new name is appended to the registry, not sorted in).
    """
    if user_model is None or isinstance(user_model, prlhf.UniformUserModel):
        raise ValueError("this run's user model is uniform (vanilla DPO): every user shares one embedding, "
                         "so there is no per-user row to fit")
    if registry.row(name) != 0:
        raise ValueError(f"user {name!r} is already known to this run (row {registry.row(name)}); "
                         f"pick a new name")
    new_registry = prlhf.UserRegistry(registry.users + [str(name)])
    n, tokens, d = user_model.n_users, user_model.n_user_tokens, user_model.hidden_size
    if isinstance(user_model, prlhf.IndividualUserModel):
        table = user_model.embeddings.detach().cpu()  # (N + 1, T_u, d)
        new_row = torch.zeros_like(table[:1]) if user_model.add_generic_user else table[:1].clone()  # (1, T_u, d)
        new = prlhf.IndividualUserModel(n + 1, tokens, d, user_model.add_generic_user,
                                        torch.cat([table, new_row]))  # (N + 2, T_u, d)
    else:
        logits = user_model.user_logits.detach().cpu()  # (N + 1, K)
        new = prlhf.ClusterUserModel(n + 1, tokens, d, user_model.n_clusters,
                                     user_model.cluster_embeddings.detach().cpu(),
                                     torch.cat([logits, logits[:1]]))  # (N + 2, K)
    return new.to(next(user_model.parameters()).device), new_registry


def row_parameter(user_model) -> torch.nn.Parameter:
    """The table whose rows are per-user: o_i (individual) or w_i (cluster)."""
    return user_model.embeddings if isinstance(user_model, prlhf.IndividualUserModel) else user_model.user_logits


def cached_reference(reference, items, collate, batch_size: int = 16):
    """Reference log-probs computed once for `items` (they never change while a row is fitted)."""
    if reference is None:
        return None
    return reference_cache(reference, {"train": items}, collate, batch_size=batch_size)


def new_user_loss(run: runs.Run, user_model, batch, reference) -> torch.Tensor:
    """The run's own objective with alpha = 1 (only the new user's term): P-DPO, or P-RM for a prm run."""
    if run.reward_head is not None:
        return prlhf.prm_step(run.model, run.reward_head, user_model, batch, alpha=1.0,
                              shared_prompt=run.pdpo.shared_prompt)["losses"].mean()
    return prlhf.pdpo_step(run.model, user_model, batch, reference, run.pdpo.personalized())["losses"].mean()


def fit_user_row(run: runs.Run, user_model, row: int, items, collate, reference, *, steps: int, lr: float,
                 batch_size: int = 8, seed: int = 0, desc=None) -> list[float]:
    """Adam on row `row` alone; the LM, the clusters and every other row stay frozen. Returns the losses.

    A gradient hook zeroes every other row's gradient; Adam (no weight decay) then leaves those rows
    bit-for-bit unchanged.
    """
    run.model.requires_grad_(False)
    user_model.requires_grad_(False)
    table = row_parameter(user_model)
    table.requires_grad_(True)
    mask = torch.zeros_like(table)
    mask[row] = 1
    hook = table.register_hook(lambda grad: grad * mask)
    optimizer = torch.optim.Adam([table], lr=lr)
    losses, epoch, batches = [], 0, []
    for _ in tqdm(range(steps), desc=desc, disable=desc is None, leave=False):
        if not batches:  # a new pass over the user's pairs, in a new order
            batches = data.make_batches(items, batch_size, shuffle=True, seed=seed, epoch=epoch)
            epoch += 1
        loss = new_user_loss(run, user_model, collate([items[i] for i in batches.pop()]), reference)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    hook.remove()
    table.requires_grad_(False)
    return losses


def row_accuracy(run: runs.Run, user_model, row: int, items, device, reference, batch_size=16) -> dict:
    """Accuracy of every pair in `items` scored as user row `row` (0 = the generic embedding e_0)."""
    records = score_pairs(run.model, user_model, items, pair_collate(run, device, lambda _: row), run.pdpo,
                          reference=reference, head=run.reward_head, batch_size=batch_size)
    return accuracy_table([{**r, "all": "all"} for r in records], "all")["all"]


def user_pairs(pairs: list[data.Pair], name: str, data_file) -> list[data.Pair]:
    mine = [p for p in pairs if p.user == str(name)]
    if not mine:
        users = ", ".join(list(dict.fromkeys(p.user for p in pairs))[:5])
        raise data.DataError(f"{data_file}: no pairs with \"user\": {json.dumps(str(name))} (users there: {users})")
    return mine


CURVE_SIZES = (1, 4, 16, 64)


def adaptation_curve(run: runs.Run, reference_model, fit_pairs, held_out_pairs, name: str, *, device,
                     sizes=CURVE_SIZES, steps: int = 32, lr: float = 0.05, seed: int = 0, quiet=False) -> list[dict]:
    """Held-out accuracy for the new user after fitting their row on the first k pairs, for each k.

    k = 0 is the generic embedding e_0 (where every fit starts). Each k starts afresh from e_0 with
    the same number of steps, so the points differ only in how much of the user's data they saw.
    """
    user_model, registry = add_user(run.user_model, run.registry, name)
    row = registry.row(name)
    collate = pair_collate(run, device, registry.row)
    fit_items, held_items = tokenize(run, fit_pairs), tokenize(run, held_out_pairs)
    online = online_reference(reference_model, run.pdpo)
    fit_reference = cached_reference(online, fit_items, collate, 16)
    held_reference = cached_reference(online, held_items, collate, 16)
    curve = [{"fit_pairs": 0, **row_accuracy(run, user_model, 0, held_items, device, held_reference)}]
    for k in [k for k in sizes if k <= len(fit_items)]:
        fitted = copy.deepcopy(user_model)
        fit_user_row(run, fitted, row, fit_items[:k], collate, fit_reference, steps=steps, lr=lr, seed=seed,
                     desc=None if quiet else f"fitting on {k} pairs")
        curve.append({"fit_pairs": k, **row_accuracy(run, fitted, row, held_items, device, held_reference)})
    return curve


def adapt_user(run_dir, name: str, data_file, *, out=None, reference: str | None = None, steps: int = 32,
               lr: float = 0.05, batch_size: int = 8, seed: int = 0, device: str = "auto", quiet: bool = False) -> dict:
    """`adapt.py`: fit a new user's row on all their pairs in `data_file` and save it into the run, or into
    `out`, a copy of the run (copy_run), leaving the run as it was.

    Saving rewrites user_model.safetensors, user_model.json and users.json; the LM is untouched. All or
    nothing: everything is read and checked, and the row fitted, before the first write (runs.replace_files).
    Returns the row, the losses' ends, and accuracy on those (training) pairs for e_0 and the new row.
    """
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps and batch size must be >= 1 and lr > 0, got {steps}, {batch_size} and {lr}")
    device = runs.pick_device(device)
    pairs = user_pairs(read_data(data_file), name, data_file)
    if out is not None:
        check_new_run(Path(out), Path(run_dir))
    run = open_run(run_dir, torch.float32, device)
    if run.registry.row(name) != 0:
        raise ValueError(f"{Path(run_dir) / 'users.json'}: user {name!r} is already known to this run (row "
                         f"{run.registry.row(name)}; an earlier adapt.py saved them?) and is served by that row: "
                         f"give another --user name, or adapt a run without them with --out NEW_RUN")
    reference_model = load_reference(run_dir, run, reference, torch.float32, device)
    user_model, registry = add_user(run.user_model, run.registry, name)
    row, collate, items = registry.row(name), pair_collate(run, device, registry.row), tokenize(run, pairs)
    reference_fn = cached_reference(online_reference(reference_model, run.pdpo), items, collate)
    before = row_accuracy(run, user_model, 0, items, device, reference_fn)
    losses = fit_user_row(run, user_model, row, items, collate, reference_fn, steps=steps, lr=lr,
                          batch_size=batch_size, seed=seed, desc=None if quiet else f"fitting {name}")
    after = row_accuracy(run, user_model, row, items, device, reference_fn)
    if out is None:
        runs.replace_files(Path(run_dir), lambda tmp: prlhf.save_user_model(tmp, user_model, registry))
    else:
        replace_directory(Path(out), lambda tmp: copy_run(Path(run_dir), tmp, user_model, registry))
    return {"user": name, "row": row, "pairs": len(items), "steps": steps, "first_loss": losses[0],
            "last_loss": losses[-1], "generic": before, "adapted": after}


def check_new_run(out: Path, run_dir: Path):
    """--out NEW_RUN: a new or empty directory in a writable place, outside the run (a run is never merged into
    another)."""
    data.check_out_dir(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: not empty; give a new or empty directory for the copy of the run")
    if out.resolve().is_relative_to(run_dir.resolve()):
        raise ValueError(f"--out {out}: inside the run {run_dir}; give a directory outside it")


LINKED = "weights (*.safetensors but the user model's) hard-linked, other files copied"


def copy_run(run_dir: Path, new: Path, user_model, registry: prlhf.UserRegistry):
    """run_dir into `new` (an empty directory) with `user_model` and `registry` as its users. The weights are
    hard links (no extra disk; every writer here replaces a weight file by rename, never in place), or copies
    on another filesystem; checkpoint/ (training's resume state) is left out: the copy is a finished run."""
    def link_or_copy(source, target):
        if source.endswith(".safetensors") and Path(source).name not in prlhf.USER_MODEL_FILES:
            try:
                return os.link(source, target)
            except OSError:
                pass
        return shutil.copy2(source, target)

    shutil.copytree(run_dir, new, ignore=shutil.ignore_patterns("checkpoint", *prlhf.USER_MODEL_FILES, runs.PARTIAL + "*"),
                    copy_function=link_or_copy, dirs_exist_ok=True)
    prlhf.save_user_model(new, user_model, registry)


def adapt_curve(run_dir, name: str, fit_pairs: list[data.Pair], held_pairs: list[data.Pair], about: str, *,
                reference: str | None = None, steps: int = 32, lr: float = 0.05, seed: int = 0, device: str = "auto",
                quiet: bool = False) -> dict:
    """`adapt.py --curve`: adaptation_curve of user `name` (fitted on prefixes of fit_pairs, scored on
    held_pairs; `about` says where they came from). Saves nothing into the user model; writes
    adapt_curve.json (and adapt_curve.png) into the run."""
    if not held_pairs:  # only examples.toy --curve can ask for none
        raise ValueError(f"no held-out pairs to score the curve on ({about}): ask for at least one (--held-out >= 1)")
    device = runs.pick_device(device)
    run = open_run(run_dir, torch.float32, device)
    reference_model = load_reference(run_dir, run, reference, torch.float32, device)
    points = adaptation_curve(run, reference_model, fit_pairs, held_pairs, name, device=device, steps=steps, lr=lr,
                              seed=seed, quiet=quiet)
    result = {"user": name, "data": about, "steps": steps, "lr": lr, "held_out_pairs": len(held_pairs),
              "curve": points}

    def write(tmp: Path):  # both files or neither
        runs.atomic_write_json(result, tmp / "adapt_curve.json")
        plot_curve(points, name, tmp / "adapt_curve.png")

    written = runs.replace_files(Path(run_dir), write)
    return result | {"plotted": Path(run_dir) / "adapt_curve.png" in written}


def print_curve(result: dict, run_dir):
    print(f"held-out accuracy of {result['user']} ({result['held_out_pairs']} pairs; {result['data']}), "
          f"{result['steps']} steps per fit, 95% Wilson:")
    for p in result["curve"]:
        label = "generic e_0" if p["fit_pairs"] == 0 else f"{p['fit_pairs']} pairs"
        print(f"  {label:<12} {p['accuracy']:.3f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]")
    report.print_written([Path(run_dir) / "adapt_curve.json"],
                         [str(Path(run_dir) / "adapt_curve.png")] if result.get("plotted") else None)


def plot_curve(points: list[dict], name: str, file: Path) -> bool:
    """adapt_curve.png: held-out accuracy against pairs fitted on (log axis); False without matplotlib."""
    plt = import_pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [max(p["fit_pairs"], 0.5) for p in points]  # k = 0 (generic e_0) drawn at 0.5 on the log axis
    acc = [p["accuracy"] for p in points]
    ax.errorbar(xs, acc, yerr=error_bars(acc, [p["ci95"] for p in points]), marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xticks(xs, ["e_0"] + [str(p["fit_pairs"]) for p in points[1:]])
    ax.set_xlabel("pairs the new user's row was fitted on")
    ax.set_ylabel("held-out accuracy (95% Wilson)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"adapting to {name}")
    save_figure(plt, fig, file)
    return True


# ----------------------------------------------------------------------------------------------
# Inspecting users: the registry, cluster weights, nearest neighbours among user embeddings


def describe_users(run_dir, neighbours: int = 3) -> str:
    """The registry, each user's cluster weights softmax(w_i) (cluster model), and the nearest users by
    cosine similarity of e_u (generic row 0 included). Reads only the user model, not the LM."""
    run_dir = check_run_dir(run_dir)
    if not (run_dir / "user_model.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no user model (user_model.json); an SFT run has none")
    user_model, registry = prlhf.load_user_model(run_dir)
    cfg = user_model.config()
    lines = [f"{run_dir}: {cfg['kind']} user model, T_u = {cfg['n_user_tokens']}, d = {cfg['hidden_size']}"
             + (f", K = {cfg['n_clusters']} clusters" if cfg["kind"] == "cluster" else "")
             + f"; {registry.n_users} known users + the generic row 0"]
    names = ["<generic e_0>"] + registry.users
    named = user_vectors(user_model, registry)
    similarity = None
    if named is not None:
        unit = torch.nn.functional.normalize(named[1], dim=1)  # (N + 1, T_u * d)
        similarity = (unit @ unit.T).fill_diagonal_(-float("inf"))  # (N + 1, N + 1), self excluded
    weights = user_model.cluster_weights(torch.arange(len(registry))) if cfg["kind"] == "cluster" else None
    header = f"{'row':>4}  {'user':<16}"
    if weights is not None:
        header += "  " + " ".join(f"{'c_' + str(k + 1):>6}" for k in range(weights.shape[1]))
    if similarity is not None:
        header += "  nearest (cosine of e_u)"
    lines.append(header)
    for i, name in enumerate(names):
        line = f"{i:>4}  {name:<16}"
        if weights is not None:
            line += "  " + " ".join(f"{w:>6.3f}" for w in weights[i].tolist())
        if similarity is not None and len(names) > 1:
            top = similarity[i].topk(min(neighbours, len(names) - 1))
            line += "  " + ", ".join(f"{names[j]} {s:.3f}" for s, j in zip(top.values.tolist(), top.indices.tolist()))
        lines.append(line)
    if named is None:
        lines.append("every user gets the same embedding (uniform user model, or T_u = 0): no neighbours")
    return "\n".join(lines)




# ----------------------------------------------------------------------------------------------
# Command line: `adapt.py RUN_DIR ...`, `adapt.py users RUN_DIR`


ADAPT_HELP = """Fit a new user's row of the user model f_P from their pairs and save it into the run,
so the user is then served like a known one. The LM, e_0 and the other users stay frozen. The row
starts at the generic embedding e_0 (individual model: o_new = 0; cluster model: w_new = w_0), which
is what the user got while unseen. With --curve: held-out accuracy after fitting on 1, 4, 16 and 64
of their pairs (the last quarter held out), against e_0; nothing is saved into the user model
(adapt_curve.json goes into the run). `python -m examples.toy --curve RUN_DIR` does the same for a fresh
user of the built-in toy task. `python adapt.py users RUN_DIR` lists the learned users."""


def adapt_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="adapt.py", description=ADAPT_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a pdpo or prm run with an individual or cluster user model")
    p.add_argument("--user", default=None, help="the new user's identifier")
    p.add_argument("--data", default=None, help="JSON Lines pairs; the lines whose 'user' is --user are used")
    p.add_argument("--out", default=None, metavar="NEW_RUN", help="save into a copy of the run, NEW_RUN (a new or "
                   f"empty directory; {LINKED}), and leave RUN_DIR as it was (default: save into RUN_DIR)")
    p.add_argument("--curve", action="store_true", help="held-out accuracy against pairs seen (saves no row)")
    curve_flags(p)
    batch = cli.Number(int, 1)
    p.add_argument("--batch-size", type=batch, default=8, help=f"pairs per step; {batch} (default: %(default)s)")
    common_flags(p)
    return p


def curve_flags(p: argparse.ArgumentParser):
    """Flags of a fit: adapt.py's, and examples/toy.py --curve's."""
    steps, lr = cli.Number(int, 1), cli.Number(float, 0, above=True)
    p.add_argument("--steps", type=steps, default=32, help=f"Adam steps per fit; {steps} (default: %(default)s)")
    p.add_argument("--lr", type=lr, default=0.05, help=f"learning rate of the new row; {lr} (default: %(default)s)")


def users_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="adapt.py users", description="The user registry, each user's cluster weights "
                                "softmax(w_i) (cluster model), and each user's nearest neighbours by cosine "
                                "similarity of their embeddings e_u (generic row 0 included).")
    p.add_argument("run", metavar="RUN_DIR", help="a run with a user model")
    neighbours = cli.Number(int, 1)
    p.add_argument("--neighbours", type=neighbours, default=3,
                   help=f"neighbours listed per user; {neighbours} (default: %(default)s)")
    return p


def run_adapt(args):
    options = dict(reference=args.reference, steps=args.steps, lr=args.lr, seed=args.seed, device=args.device,
                   quiet=args.quiet)
    if not args.user or not args.data:
        runs.fail("adapt.py needs --user NAME and --data FILE with their pairs (for the built-in toy task's new "
                  "user: python -m examples.toy --curve RUN_DIR)")
    if args.curve and args.out:
        runs.fail("--out is for saving a fitted user into a copy of the run; --curve saves no user (it writes "
                  "adapt_curve.json and adapt_curve.png into RUN_DIR)")
    if args.curve:
        pairs = user_pairs(read_data(args.data), args.user, args.data)
        n_held = max(1, len(pairs) // 4)
        r = adapt_curve(args.run, args.user, pairs[:-n_held], pairs[-n_held:], str(args.data), **options)
        return print_curve(r, args.run)
    r = adapt_user(args.run, args.user, args.data, out=args.out, batch_size=args.batch_size, **options)
    g, a = r["generic"], r["adapted"]
    print(f"user {args.user}: row {r['row']}, fitted on {r['pairs']} pairs in {r['steps']} steps "
          f"(loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}); accuracy on these pairs (not held out): "
          f"generic e_0 {g['accuracy']:.3f} -> fitted {a['accuracy']:.3f}")
    files = ", ".join(prlhf.USER_MODEL_FILES)
    if args.out:
        print(f"wrote {args.out}: a copy of {args.run} ({LINKED}) with {files} rewritten; {args.user} is a known "
              f"user there; {args.run} is unchanged")
    else:
        print(f"changed {args.run}: rewrote {files}; {args.user} is now a known user of it (the LM is unchanged; "
              f"--out NEW_RUN saves into a copy instead)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "users":
            args = users_parser().parse_args(argv[1:])
            print(describe_users(args.run, args.neighbours))
        else:
            run_adapt(adapt_parser().parse_args(argv))
    except (data.DataError, ValueError, FileNotFoundError) as e:
        runs.fail(str(e))


if __name__ == "__main__":
    main()
