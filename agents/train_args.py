"""The settings of a MARL training run (`agents.mappo.train`), torch-free so that `cncbrain train`
generates its flags from them without loading the training stack."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Args:
    scenarios: str = "abilene"
    """Comma-separated scenario names, YAML paths or `suite:NAME`; the env copies cycle through them."""
    val_scenarios: str = ""
    """Scenarios of the greedy validation that picks the best policy ('' = the training scenarios)."""
    total_steps: int = 100_000
    """MAPPO budget in environment ticks, summed over env copies (a tick = one decision of every site)."""
    seed: int = 1
    """Seed of torch and of the training episodes' twin seeds."""
    device: str = "cpu"
    """Torch device for the networks: cpu or cuda (the twin always runs on the CPU)."""
    torch_threads: int = 1
    """CPU threads of torch; 1 is fastest for these small networks (more threads only contend with the twin)."""
    num_envs: int = 4
    """Env copies stepped in lockstep; their sites form one batch."""
    rollout_ticks: int = 120
    """Ticks collected per env copy before each update (120 = one episode of the built-in scenarios)."""
    neighbours: int = 3
    """k: neighbours an agent sees and can send overflow to."""
    hidden: int = 64
    """Width of the hidden layers of actor and critic."""
    learning_rate: float = 3e-4
    """Adam step size of the MAPPO phase."""
    anneal_lr: bool = True
    """Decay the MAPPO learning rate linearly to zero over `total_steps`."""
    gamma: float = 1.0
    """Discount; 1 because the rewards telescope to the episode's score."""
    gae_lambda: float = 0.95
    """GAE λ."""
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 4
    """Minibatches per pass."""
    clip_coef: float = 0.1
    """PPO ratio clip; small, to stay near the warm start."""
    ent_coef: float = 0.001
    """Entropy bonus."""
    vf_coef: float = 0.5
    """Value loss weight."""
    max_grad_norm: float = 0.5
    """Gradient clipping."""
    target_kl: float = 0.03
    """Stop an update's epochs early when the approximate KL passes this (0 disables)."""
    reward_scale: float = 10.0
    """Team reward = reward_scale × Δscore."""
    credit: float = 0.0
    """Credit assignment: a site's reward is (1 − credit) × the team reward + credit × S × its own
    share of it (`CncPoolEnv(reward="site")`: the requests it served, the training its shards did,
    the cost of its GPUs; the shares sum to the team reward). 0: the team reward alone."""
    teacher: str = "pack"
    """Policies imitated in the warm start, comma-separated: teachers of `agents.teachers` or
    baselines; with several, each training scenario is labelled by the one that scores best on it
    ('' skips the warm start)."""
    teacher_table: str = ""
    """JSON of `benchmarks/marl_teachers_by_pool.py` (each teacher's score on each training
    scenario): with several teachers, the best of them on a scenario is read from it instead of
    being played here."""
    bc_rounds: int = 3
    """Warm-start rounds: the first follows the teachers, later ones the student (DAgger)."""
    bc_episodes: int = 4
    """Episodes per scenario per warm-start round (with many scenarios: episodes in all, see bc_scenarios)."""
    bc_scenarios: int = 0
    """Scenarios visited per warm-start round (0: every scenario, bc_episodes each; n > 0: the next n
    scenarios of the cycle, one episode each)."""
    bc_rows_per_tick: int = 12
    """Site rows kept per tick in the warm-start data besides those where the teacher acts (a random
    subset of the sites that keep everything, so a 300-site pool does not outweigh a 10-site one)."""
    bc_epochs: int = 40
    """Passes over the aggregated warm-start data after each round."""
    bc_minibatch: int = 16384
    """Rows per gradient step of the warm start (one pass over the train suite's first round, one
    episode per scenario, is about eight steps)."""
    bc_learning_rate: float = 1e-3
    """Adam step size of the warm start."""
    bc_class_weight_cap: float = 20.0
    """Rare choices (add/remove a replica, bid) weigh up to this many times more than "keep"."""
    logit_adjust: bool = False
    """After the last warm-start round, validate the actor also with the class weights' bias taken
    out of its output layer (logits − log w: the greedy choice then follows the teacher's frequencies,
    not the weighted ones) and keep whichever validates better. Off by default: it lost on
    `validation`, 0.552 against 0.656 (docs/marl.md)."""
    sharpen: float = 4.0
    """After the warm start, the actor's output layers are multiplied by this: the greedy choices stay
    the same, but MAPPO explores near them instead of sampling the rare choices (add, remove, bid)
    that the class-weighted imitation made likely."""
    val_seeds: str = "5000,5001,5002,5003,5004"
    """Twin seeds of the greedy validation episodes that pick the best policy (per validation
    scenario); "scenario": each scenario's own seed (what `cncbrain eval --suite` runs)."""
    eval_every: int = 5
    """Validate every this many MAPPO updates (0: only at the end)."""
    out: str = "runs/marl"
    """Output folder: checkpoint.pt (latest), checkpoint_warm.pt (after the warm start), policy.npz (best
    by validation), policy_last.npz, metrics.csv, learning_curve.png."""
    resume: str = ""
    """Checkpoint to resume from (its warm start is not redone)."""
    init_actor: str = ""
    """A policy file (.npz, format 2) the actor starts from, after `resume` (its critic and
    optimizer stay): fine-tuning a shipped policy. The best validation so far is forgotten."""
    coordinated: bool = False
    """The sites' replica choices go through the pool's coordination (`cncbrain.coordination`)
    in every training and validation episode, as the exported policy's will (its metadata says so)."""
    duration_s: float | None = None
    """Shorter episodes (tests); None keeps the scenarios' horizon."""
    extra: dict = field(default_factory=dict)
    """Free-form notes stored in the checkpoint and the exported policy's metadata."""
