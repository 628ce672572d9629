"""Built-in examples: the toy tasks (toy.py) and their demo (demo.py), the SmolLM2 experiments (smollm2.py: the
paper's experiment 1, conflicting lengths; psoups.py: its experiment 2, P-SOUPS styles, judged by judge.py).

They import the core files (prlhf.py, model.py, data.py, train.py, eval.py); the core never imports them,
except that `python train.py` (no arguments, or --example NAME) starts one through `run`.
"""


def run(name: str, *, out: str = "", seed: int = 0, quiet: bool = False, model: str = "", precision: str | None = None):
    """The example `name` (toy, toy-style, smollm2, psoups) end to end; its results. precision None: the example's
    own (fp32 for the toy tasks, whose tiny matrices gain nothing from bf16; auto for SmolLM2). psoups runs the
    six profile users (python -m examples.psoups for its other configurations)."""
    if name == "smollm2":
        from examples.smollm2 import smollm2_demo
        return smollm2_demo(out=out or "runs/smollm2", seed=seed, quiet=quiet, model_dir=model,
                            precision=precision or "auto")
    if name == "psoups":
        from examples.psoups import psoups_demo
        return psoups_demo(out=out or "runs/psoups", seed=seed, quiet=quiet, model_dir=model,
                           precision=precision or "auto")
    from examples.demo import demo
    task = {"toy": "length", "toy-style": "style"}[name]
    return demo(seed=seed, out=out or f"runs/demo{'' if task == 'length' else '-' + task}", quiet=quiet, task=task,
                precision=precision or "fp32")
