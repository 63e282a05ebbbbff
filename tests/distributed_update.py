"""One PPO update on a fixed rollout batch, run by each data-parallel process on its share.

    python tests/distributed_update.py MODEL OUT [fold]                        (one process)
    torchrun --nproc_per_node 2 tests/distributed_update.py MODEL OUT [fold]   (two processes)

The batch is built identically on every process from fixed seeds; each process keeps its
contiguous share of the rows. With `fold` each process's share is one micro-batch and the
update's forward pass gives the values (`rl.fold_forward`) instead of the pass below. The main
process saves the updated parameters to OUT.
"""

import sys

import torch

import rlhf  # noqa: F401  (sets the OpenMP wait policy before torch does work)
from rlhf import ops, ppo, rl, training
from rlhf.models import response_slice
from rlhf.rollout import Rollout
from rlhf.encoding import pad
from rlhf.models import load_tokenizer
from rlhf.scoring import RewardSourceConfig

model_dir, out = sys.argv[1], sys.argv[2]
fold = sys.argv[3:] == ["fold"]
accelerator = training.make_accelerator()
config = ppo.PPOConfig(
    policy=model_dir,
    reward=RewardSourceConfig(kind="function", path="unused:unused"),
    algo=ppo.PPOAlgoConfig(batch_size=8, minibatch_size=8, micro_batch_size=8 // accelerator.num_processes if fold else 2, epochs=1),
    optim=rl.OptimConfig(lr=1e-2, schedule="constant"),
)
tokenizer = load_tokenizer(model_dir)
torch.manual_seed(0)
model, reference = rl.build_models(config, ppo.PPO(config), tokenizer, accelerator.device)

# the global batch: 8 prompts, responses of lengths 1..8 ending in EOS, fixed scores
prompts = [tokenizer(f"User: question number {i} about my refund?\nAssistant:")["input_ids"][: 6 + i] for i in range(8)]
query, query_mask = pad(prompts, tokenizer.pad_token_id, side="left")
generator = torch.Generator().manual_seed(1)
responses = torch.randint(5, 300, (8, 8), generator=generator)
lengths = torch.arange(1, 9)
for row, n in enumerate(lengths):
    responses[row, n - 1] = tokenizer.eos_token_id
    responses[row, n:] = tokenizer.pad_token_id
mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
scores = torch.randn(8, generator=generator)
batch = Rollout(query, query_mask, responses, mask, torch.ones(8, dtype=torch.bool), None, None, None, scores, scores)
model.eval()
with torch.no_grad():
    logits, values = model(*batch.inputs())
    P = query.shape[1]
    batch.logprobs = ops.logprobs_from_logits(response_slice(logits, P), responses)
    batch.values = response_slice(values, P)
    batch.ref_logprobs = batch.logprobs - 0.1 * torch.randn(8, 8, generator=generator)

# this process's share of the rows
share = slice(accelerator.process_index * 8 // accelerator.num_processes, (accelerator.process_index + 1) * 8 // accelerator.num_processes)
for name in ("query", "query_mask", "responses", "mask", "ended", "logprobs", "ref_logprobs", "values", "scores", "raw_scores"):
    setattr(batch, name, getattr(batch, name)[share])

optimizer, scheduler = training.make_optimizer(model, config.optim, 1)
model, optimizer = accelerator.prepare(model, optimizer)
model.train()
first = None
if fold:
    assert rl.folds(config.algo, 1, accelerator.num_processes)
    batch.values = None
    first = rl.fold_forward(model, batch, config, False)
ppo.PPO(config).advantages(batch, 0.05, lambda t: accelerator.reduce(t, "sum"))
stats = rl.update_epochs(model, ppo.PPO(config), optimizer, scheduler, batch, config, accelerator, False, torch.Generator().manual_seed(2), 0.05, first)
if accelerator.is_main_process:
    state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    torch.save({"params": state, "stats": stats}, out)
