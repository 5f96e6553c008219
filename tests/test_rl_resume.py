"""End-to-end RL core on the tiny model: NFT clip-window steps through PolicySet + TrainingState.

N steps, save, reload into a fresh state, K more steps == N + K uninterrupted (weights, RNG included)."""

import torch

from astrolabe.models.wan.attention import CausalWindow
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.rl.lora import LoRAConfig, adapter_parameters
from astrolabe.rl.nft import NFTConfig
from astrolabe.rl.policies import PolicyConfig, PolicySet
from astrolabe.rl.state import OptimConfig, TrainingState
from astrolabe.rl.streaming_update import WindowBatch, window_nft_step
from astrolabe.sampling.schedule import FlowSchedule, StepSchedule
from astrolabe.sampling.streaming import StreamConfig

SPEC = StreamConfig(CausalWindow(3, 6, 3), StepSchedule.from_steps(FlowSchedule(5.0), [1000, 750, 500, 250]), 16, 4, 4)


def fresh_state(lora_seed):
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(0))
    ps = PolicySet.build(m.eval(), LoRAConfig(rank=4, alpha=8.0), PolicyConfig(),
                         generator=torch.Generator().manual_seed(lora_seed))
    st = TrainingState(ps, OptimConfig(lr=1e-3, precision="fp32"))
    gens = {"sigma": torch.Generator().manual_seed(1), "noise": torch.Generator().manual_seed(2)}
    for name, g in gens.items():
        st.register_generator(name, g)
    return st, gens


def make_batch():
    g = torch.Generator().manual_seed(3)
    return WindowBatch(
        context=torch.randn(2, 4, 32, generator=g),
        prefix_latents=torch.randn(2, 6, 16, 4, 4, generator=g),
        window_x0=torch.randn(2, 3, 16, 4, 4, generator=g),
        r=torch.tensor([0.9, 0.2]),
        kl_mask=torch.tensor([True, False]),
    )


def step(st, gens):
    ps = st.policies
    policies = {"default": lambda: ps.use("default"), "old": lambda: ps.use("old"), "ref": lambda: ps.use("ref")}
    window_nft_step(policies, ps.model, SPEC, make_batch(), NFTConfig(), gens["sigma"], gens["noise"])
    st.optimizer_step()
    st.update_old(st.step)  # one phase per step here: iterations completed = steps


def test_window_step_changes_every_lora_tensor_and_resume_is_exact(tmp_path):
    st, gens = fresh_state(7)
    base_before = {k: v.clone() for k, v in st.policies.base_model.state_dict().items() if "lora" not in k}
    before = {k: p.detach().clone() for k, p in adapter_parameters(st.policies.model, "default").items()}
    step(st, gens)
    after = adapter_parameters(st.policies.model, "default")
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every LoRA tensor moved
    base_after = {k: v for k, v in st.policies.base_model.state_dict().items() if "lora" not in k}
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # nothing else did
    step(st, gens)
    path = st.save(tmp_path / "ckpt")
    step(st, gens), step(st, gens)  # uninterrupted: 4 steps

    resumed, gens2 = fresh_state(99)
    resumed.load(path)
    step(resumed, gens2), step(resumed, gens2)
    a = adapter_parameters(st.policies.model, "default")
    b = adapter_parameters(resumed.policies.model, "default")
    assert resumed.step == st.step == 4
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7), k
