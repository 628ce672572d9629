"""The report of an evaluation (`python eval.py RUN --data F`): report.md, plots and the printed summary.

eval.py scores and samples the runs; this file lays out what it measured: markdown tables side by side (accuracy
with 95% Wilson intervals, response lengths, generation quality, by group and by user), and plots (accuracy per
user, response lengths, the learned user embeddings on two principal components). It also measures whether the
users take hold, where that is read: train.py's per-step norms and per-user accuracy, and the LM's attention to
the user positions (attention_to_user).
matplotlib is optional: without it the report says the plots were skipped.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

import data
import model as lm
import prlhf


def run_names(paths: list[Path]) -> list[str]:
    """Runs are named by their directory; two runs with the same name get their parent's name too."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return names


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"


def length_cell(entry: dict | None) -> str:
    if entry is None or entry.get("response_tokens") is None:
        return "-"
    t = entry["response_tokens"]
    return f"{entry['mean_response_tokens']:.1f} ({t['median']:g}; {t['min']}-{t['max']})"


def quality_cell(entry: dict | None) -> str:
    if entry is None or entry.get("empty") is None:
        return "-"
    return f"{entry['empty']:.0%} / {entry['repeated_3gram']:.0%} / {entry['distinct_2']:.2f}"


def side_by_side(results: dict, section: str, first_columns, cell) -> str:
    """One row per name in `section` (union over runs), one column per run."""
    names = sorted({n for r in results.values() for n in r[section]})
    header = [c for c, _ in first_columns] + list(results)
    rows = [[f(n) for _, f in first_columns] + [cell(r[section].get(n)) for r in results.values()] for n in names]
    return markdown_table(header, rows)


def user_groups(pairs: list[data.Pair]) -> dict[str, str]:
    """Each user's most common group label in the data ("(none)" if unlabelled)."""
    labels = {}
    for p in pairs:
        labels.setdefault(p.user, Counter())[p.group or "(none)"] += 1
    return {u: c.most_common(1)[0][0] for u, c in labels.items()}


def report_markdown(results: dict, data_file, pairs: list[data.Pair], notes: list[str], plots: list[str] | None,
                    settings: str) -> str:
    groups = user_groups(pairs)
    out = [f"# Evaluation: {' vs '.join(results)}", "",
           f"Data: `{data_file}`, {len(pairs)} pairs from {len(groups)} users.", "",
           "Accuracy: share of pairs with r(x, y_w, u) > r(x, y_l, u), where r is the implicit personalized "
           "reward beta * (log pi(y|x,u) - log pi_ref(y|x)) of a pdpo run, or the reward head of a prm run. "
           "Brackets: 95% Wilson score interval. Unseen users (not in the run's training data) get the generic "
           "embedding e_0.", ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    out += accuracy_section(results, groups) + length_section(results, groups, settings) + users_section(results)
    return "\n".join(out + plots_section(plots)) + "\n"


# ----------------------------------------------------------------------------------------------
# Do the users take hold? What train.py logs per step (metrics.jsonl: measured here, rendered below) and
# where the LM looks


def accuracy_by(pairs: list, key: int) -> dict:
    """Training accuracy per user (key 0) or group (key 1) over (user, group, correct) of one step."""
    by = {}
    for pair in pairs:
        by.setdefault(str(pair[key]), []).append(pair[2])
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


@torch.no_grad()
def user_model_norms(user_model) -> dict:
    """Whether the users take hold (docs/user_embeddings.md): ||e_0||, the mean ||e_u - e_0|| over known users
    (the offsets o_u of the individual model), and gradient norms before clipping; a per-user table's
    gradient is split into row 0 (e_0 or w_0) and the mean over the known users' rows."""
    if user_model is None or user_model.n_user_tokens == 0:
        return {}
    e = user_model(torch.arange(user_model.n_users + 1, device=next(user_model.parameters()).device))
    e = e.flatten(1).float()  # (N + 1, T_u * d)
    out = {"e0_norm": e[0].norm().item(), "offset_norm": (e[1:] - e[0]).norm(dim=1).mean().item()}
    for name, param in user_model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.float().reshape(param.shape[0], -1)  # (rows, rest)
        if param.shape[0] == user_model.n_users + 1:
            out[f"grad_{name}_row0"] = grad[0].norm().item()
            out[f"grad_{name}_users"] = grad[1:].norm(dim=1).mean().item()
        else:
            out[f"grad_{name}"] = grad.norm().item()
    return out


def attention_weights(attention: lm.Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) of one causal attention layer on its input x (B, T, d): (B, nh, T, T), the
    weights SDPA applies without returning them."""
    cfg, (B, T, _) = attention.cfg, x.shape
    q = attention.wq(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hs)
    k = attention.wk(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
    q, k = lm.apply_rotary(q, cos, sin, cfg.family), lm.apply_rotary(k, cos, sin, cfg.family)
    k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)  # (B, nh, T, hs)
    scores = (q @ k.transpose(-1, -2)).float() / cfg.head_dim ** 0.5  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.no_grad()
def attention_to_user(run, items: list, max_pairs: int = 32) -> list[float] | None:
    """Per layer, the mean attention mass that the positions predicting a response token put on the T_u user
    positions, in [BOS] [e_u] [user text] [prompt] [y_w] of up to max_pairs pairs: does the LM look at e_u?
    Recomputed from each attention layer's inputs (SDPA returns no weights); None without user embedding."""
    T_u = run.user_model.n_user_tokens if run.user_model is not None else 0
    if T_u == 0 or not items:
        return None
    weights = []

    def record(attention, args, _):  # args: x, cos, sin, mask, cache
        weights.append(attention_weights(attention, *args[:3]))

    hooks = [m.register_forward_hook(record) for m in run.model.modules() if isinstance(m, lm.Attention)]
    device, per_pair = run.model.tok_embeddings.weight.device, []
    try:
        for it in items[:max_pairs]:
            prefix = data.prefix_ids(run.tokenizer, it.prompt_ids, it.user_text_ids if run.pdpo.use_user_text else [])
            weights.clear()
            prlhf.user_conditioned_hidden(run.model, run.user_model, torch.tensor([prefix + it.chosen_ids], device=device),
                                          run.registry.rows([it.user]).to(device))
            start = T_u + len(prefix) - 1  # the position that predicts the first response token
            per_pair.append([w[0, :, start:-1, 1:1 + T_u].sum(-1).mean().item() for w in weights])
    finally:
        for hook in hooks:
            hook.remove()
    return [sum(layer) / len(layer) for layer in zip(*per_pair)]


def read_training(run_dir) -> list[dict]:
    """The steps of RUN/metrics.jsonl with user diagnostics (train.py writes them for pdpo runs)."""
    file = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []
    return [r for r in rows if "group_accuracy" in r or "offset_norm" in r]


def training_summary(rows: list[dict]) -> dict | None:
    """Per group, the personalized term's training accuracy over each fifth of training, and the norms of e_0
    and of the offsets e_u - e_0 at the first and the last step. None without diagnostics."""
    if not rows:
        return None
    fifths = [rows[k * len(rows) // 5:(k + 1) * len(rows) // 5] for k in range(5)]
    groups = sorted({g for r in rows for g in r.get("group_accuracy", {})})

    def mean_in(part, group):
        values = [r["group_accuracy"][group] for r in part if group in r.get("group_accuracy", {})]
        return sum(values) / len(values) if values else None

    return {"group_accuracy_by_fifth": {g: [mean_in(part, g) for part in fifths] for g in groups},
            "norms_first_last": {k: [rows[0][k], rows[-1][k]] for k in ("e0_norm", "offset_norm") if k in rows[0]}}


def users_section(results: dict) -> list[str]:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    training = {name: r["training"] for name, r in results.items() if r.get("training")}
    attention = {name: r["attention_to_user"] for name, r in results.items() if r.get("attention_to_user")}
    if not training and not attention:
        return []
    out = ["## Do the users take hold?", "", "Whether the learned user embeddings separate the users "
           "(docs/user_embeddings.md): the personalized term's accuracy on each group's own training pairs over "
           "the fifths of training (metrics.jsonl), the norms of e_0 and of the offsets e_u - e_0 at the first "
           "and last step, and the attention mass that the positions predicting a response token put on the user "
           "positions.", ""]
    if training:
        rows = [[name, g, *map(fmt, a)] for name, t in training.items() for g, a in t["group_accuracy_by_fifth"].items()]
        out += [markdown_table(["run", "group", "1st fifth", "2nd", "3rd", "4th", "5th"], rows), ""]
        rows = [[name, *(" -> ".join(map(fmt, t["norms_first_last"][k])) for k in ("e0_norm", "offset_norm"))]
                for name, t in training.items() if t["norms_first_last"]]
        out += [markdown_table(["run", "norm of e_0, first -> last step", "mean norm of e_u - e_0"], rows), ""] if rows else []
    if attention:
        layers = max(len(a) for a in attention.values())
        rows = [[name, *(fmt(a[i]) if i < len(a) else "-" for i in range(layers))] for name, a in attention.items()]
        out += [markdown_table(["run", *(f"layer {i}" for i in range(layers))], rows), ""]
    return out


def plot_training(plt, training: dict):
    """Per run: each group's training accuracy (5-step running mean) and the norms of e_0 and the offsets."""
    drawable = {name: rows for name, rows in training.items() if rows}
    if not drawable:
        return None
    fig, (acc_ax, norm_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, rows) in enumerate(drawable.items()):
        style = ["-", "--", ":"][i % 3]
        groups = sorted({g for r in rows for g in r.get("group_accuracy", {})})
        for k, group in enumerate(groups):
            steps = [r["step"] for r in rows if group in r.get("group_accuracy", {})]
            values = [r["group_accuracy"][group] for r in rows if group in r.get("group_accuracy", {})]
            smooth = [sum(values[max(0, j - 4):j + 1]) / len(values[max(0, j - 4):j + 1]) for j in range(len(values))]
            acc_ax.plot(steps, smooth, style, color=f"C{k}", label=f"{name}: {group}")
        for k, key in enumerate(("e0_norm", "offset_norm")):
            if key in rows[0]:
                norm_ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, color=f"C{k}",
                             label=f"{name}: {'e_0' if key == 'e0_norm' else 'mean |e_u - e_0|'}")
    acc_ax.set(xlabel="step", ylabel="training accuracy of the personalized term", ylim=(0, 1.05))
    norm_ax.set(xlabel="step", ylabel="norm")
    for ax in (acc_ax, norm_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return fig


def accuracy_section(results: dict, groups: dict) -> list[str]:
    first = next(iter(results.values()))
    pairs_of = lambda section: lambda n: first[section][n]["pairs"] if n in first[section] else "-"  # noqa: E731
    out = ["## Preference accuracy", "",
           side_by_side(results, "status", [("users", str), ("pairs", pairs_of("status"))], accuracy_cell), ""]
    if first["groups"]:
        out += ["### By group", "",
                side_by_side(results, "groups", [("group", str), ("pairs", pairs_of("groups"))], accuracy_cell), ""]
    statuses = sorted(first["status"])
    margins = [[name, f"{r['overall']['mean_margin']:.3f}"]
               + [f"{r['status'][s]['mean_margin']:.3f}" if s in r["status"] else "-" for s in statuses]
               for name, r in results.items()]
    return out + ["### By user", "",
                  side_by_side(results, "users", [("user", str), ("group", lambda n: groups.get(n, "-")),
                                                  ("pairs", pairs_of("users"))], accuracy_cell), "",
                  "Mean reward margin r(x, y_w, u) - r(x, y_l, u):", "",
                  markdown_table(["run", "all"] + statuses, margins), ""]


def length_section(results: dict, groups: dict, settings: str) -> list[str]:
    out = ["## Generated response length (tokens)", ""]
    if all(r["overall"]["response_tokens"] is None for r in results.values()):
        return out + ["No generations.", ""]
    by_group = bool(next(iter(results.values()))["groups"])
    section, first = ("groups", "group") if by_group else ("status", "users")
    return out + [settings, "", "Cells: mean (median; min-max) over the sampled prompts.", "",
                  side_by_side(results, section, [(first, str)], length_cell), "",
                  side_by_side(results, "users", [("user", str), ("group", lambda n: groups.get(n, "-"))],
                               length_cell), "",
                  "### Generation quality", "",
                  "Cells: empty answers / answers with a repeated word 3-gram / distinct-2 (distinct word "
                  "bigrams over all bigrams of the group's answers).", "",
                  side_by_side(results, section, [(first, str)], quality_cell), "",
                  side_by_side(results, "users", [("user", str), ("group", lambda n: groups.get(n, "-"))],
                               quality_cell), ""]


def plots_section(plots: list[str] | None) -> list[str]:
    if plots is None:
        return ["## Plots", "", "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."]
    return ["## Plots", ""] + ([f"![{Path(p).stem}]({Path(p).name})" for p in plots] or ["Nothing to draw."])


def user_vectors(user_model, registry) -> tuple[list[str], torch.Tensor] | None:
    """Names and e_u of every row (generic row 0 first): (N + 1, T_u * d); None when users cannot differ."""
    if user_model is None or isinstance(user_model, prlhf.UniformUserModel) or user_model.n_user_tokens == 0:
        return None
    with torch.no_grad():
        rows = torch.arange(len(registry), device=next(user_model.parameters()).device)  # (N + 1,)
        vectors = user_model(rows).flatten(1).float().cpu()  # (N + 1, T_u, d) -> (N + 1, T_u * d)
    return ["<generic e_0>"] + registry.users, vectors


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Coordinates (n, 2) on the top two principal components of x (n, D), and their shares of variance."""
    centered = x - x.mean(dim=0)  # (n, D)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)  # vh (min(n, D), D)
    k = min(2, vh.shape[0])
    coords = centered @ vh[:k].T  # (n, k)
    if k < 2:
        coords = torch.cat([coords, torch.zeros(x.shape[0], 2 - k)], dim=1)  # (n, 2)
    variance = s ** 2
    shares = (variance[:2] / variance.sum().clamp(min=1e-12)).tolist()
    return coords, shares + [0.0] * (2 - len(shares))


def import_pyplot():
    """matplotlib.pyplot writing files only (no window), or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(results: dict, generations: dict, embeddings: dict, groups: dict, out: Path,
                training: dict | None = None) -> list[str] | None:
    """accuracy_per_user.png, response_lengths.png, user_embeddings.png, training.png (those with something to
    draw); None without matplotlib. training: each run's read_training rows."""
    plt = import_pyplot()
    if plt is None:
        return None
    figures = {"accuracy_per_user": plot_accuracy_per_user(plt, results, groups),
               "response_lengths": plot_response_lengths(plt, results, generations),
               "user_embeddings": plot_user_embeddings(plt, embeddings, groups),
               "training": plot_training(plt, training or {})}
    return [save_figure(plt, fig, out / f"{name}.png") for name, fig in figures.items() if fig is not None]


def error_bars(values: list[float], intervals: list) -> list[list[float]]:
    """matplotlib's yerr (below, above) from intervals around the values; never negative."""
    return [[max(0.0, v - lo) for v, (lo, _) in zip(values, intervals)],
            [max(0.0, hi - v) for v, (_, hi) in zip(values, intervals)]]


def plot_accuracy_per_user(plt, results: dict, groups: dict):
    """One bar per user and run, Wilson intervals as error bars, users ordered by group."""
    users = sorted({u for r in results.values() for u in r["users"]}, key=lambda u: (groups.get(u, ""), u))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(users) * len(results)), 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = [j + i * width for j, u in enumerate(users) if u in r["users"]]
        entries = [r["users"][u] for u in users if u in r["users"]]
        acc = [e["accuracy"] for e in entries]
        ax.bar(xs, acc, width, yerr=error_bars(acc, [e["ci95"] for e in entries]), capsize=2, label=name)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(users))],
                  [f"{u}\n{groups.get(u, '')}" for u in users], rotation=60, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("preference accuracy (95% Wilson)")
    ax.legend()
    return fig


def plot_response_lengths(plt, results: dict, generations: dict):
    """Box plots of generated lengths per user group (known / unseen without group labels), one per run."""
    if not any(generations.values()):
        return None
    key = "group" if next(iter(results.values()))["groups"] else "status"
    names = sorted({g[key] for gens in generations.values() for g in gens})
    step = len(generations) + 1  # a gap between groups
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(names) * len(generations)), 4))
    for i, (run, gens) in enumerate(generations.items()):
        series = [[g["response_tokens"] for g in gens if g[key] == n] or [0] for n in names]
        boxes = ax.boxplot(series, positions=[j * step + i for j in range(len(names))], widths=0.8,
                           patch_artist=True)
        for box in boxes["boxes"]:
            box.set_facecolor(f"C{i}")
        ax.plot([], [], color=f"C{i}", lw=6, label=run)  # a legend entry for the run's colour
    ax.set_xticks([j * step + (len(generations) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("generated response tokens")
    ax.legend()
    return fig


def plot_user_embeddings(plt, embeddings: dict, groups: dict):
    """The learned e_u on their top two principal components, coloured by the user's group in the data."""
    drawable = {run: e for run, e in embeddings.items() if e is not None and e[1].shape[0] >= 2}
    if not drawable:
        return None
    fig, axes = plt.subplots(1, len(drawable), figsize=(5 * len(drawable), 4.5), squeeze=False)
    for ax, (run, (names, vectors)) in zip(axes[0], drawable.items()):
        coords, shares = pca_2d(vectors)
        labels = ["generic"] + [groups.get(u, "not in data") for u in names[1:]]
        for k, label in enumerate(sorted(set(labels))):
            idx = [i for i, l in enumerate(labels) if l == label]
            ax.scatter(coords[idx, 0], coords[idx, 1], color=f"C{k}", label=label,
                       marker="*" if label == "generic" else "o", s=120 if label == "generic" else 30)
        for (px, py), n in zip(coords.tolist(), names):
            ax.annotate(n, (px, py), fontsize=6)
        ax.set_title(f"{run}: user embeddings (PCA)")
        ax.set_xlabel(f"PC1 ({shares[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({shares[1]:.0%})")
        ax.legend(fontsize=7)
    return fig


def save_figure(plt, fig, file: Path) -> str:
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return str(file)




def print_summary(results: dict):
    first = next(iter(results.values()))
    section = "groups" if first["groups"] else "status"
    print(f"\n{'run':<14}{'group' if section == 'groups' else 'users':<12}{'pairs':>6}{'accuracy':>10}"
          f"{'95% Wilson':>16}{'resp. tokens':>14}{'empty':>7}{'rep-3g':>8}{'dist-2':>8}")
    for name, r in results.items():
        for g, e in r[section].items():
            lo, hi = e["ci95"]
            gen = ["-"] * 4 if e["mean_response_tokens"] is None else [
                f"{e['mean_response_tokens']:.1f}", f"{e['empty']:.0%}", f"{e['repeated_3gram']:.0%}",
                f"{e['distinct_2']:.2f}"]
            print(f"{name:<14}{g:<12}{e['pairs']:>6}{e['accuracy']:>10.3f}{f'[{lo:.2f}, {hi:.2f}]':>16}"
                  f"{gen[0]:>14}{gen[1]:>7}{gen[2]:>8}{gen[3]:>8}")


PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install matplotlib, then run this command again)"


def print_written(files: list, plots: list[str] | None):
    """Every file a command wrote, one line each; plots None (no matplotlib) says so and how to get them."""
    print()
    for file in [*files, *(plots or [])]:
        print(f"wrote {file}")
    if plots is None:
        print(PLOTS_SKIPPED)
