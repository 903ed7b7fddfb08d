"""Layouts XLA cannot reshard cheaply: a compile under a full mesh warns.

XLA's SPMD partitioner logs "Involuntary full rematerialization" (to stderr,
from C++) when it must replicate a tensor to change its sharding: right
results, but memory and time that grow with the mesh. The compile runs in a
child process so that no compilation cache (the suite's persistent one, or
this process's) can skip it and hide the warning.
"""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One train step of a tiny model (learned positions and token types, so all
# three embedding lookups run) on a data 2 x fsdp 2 x tensor 2 mesh.
_CHILD = textwrap.dedent("""
    import numpy as np
    from configs import base
    from mlm_jax import build, masking, model_config, optimizer, sharding
    c = base.get_config()
    c.seq_len, c.batch_size = 16, 8
    c.model.update(size='tiny', num_layers=1, hidden_dim=32, num_heads=4,
                   mlp_dim=64, max_len=16, type_vocab_size=2)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(c)
    mcfg = model_config.from_config(c, 64)
    tx = optimizer.create(c)
    graphdef, state, state_sharding = build.init_state(mcfg, c.seed, tx, mesh)
    masker = masking.Masker(special_ids=(0, 1, 2, 3, 4), mask_id=4,
                            vocab_size=64, max_predictions=4)
    step, to_device = build.make_train_step(
        mesh, state_sharding, parallelism=c.parallelism,
        grad_accum_steps=c.grad_accum_steps, graphdef=graphdef, tx=tx,
        masker=masker, rate_fn=lambda _: 0.15)
    ids = np.random.default_rng(0).integers(5, 64, (8, 16)).astype(np.int32)
    batch = {'input_ids': ids, 'segment_ids': np.ones_like(ids)}
    state, m = step(state, to_device(batch))
    print('loss', float(m['loss'][0] / m['loss'][1]))
""")


def test_train_step_on_data_fsdp_tensor_mesh_compiles_without_remat():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('JAX_COMPILATION_CACHE')}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', _CHILD], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'loss' in out.stdout
  remats = [line for line in out.stderr.splitlines()
            if 'Involuntary full rematerialization' in line]
  assert not remats, '\n'.join(line[:400] for line in remats[:4])
