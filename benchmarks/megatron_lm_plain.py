"""`python benchmarks/megatron_lm_plain.py SCRIPT [ARGS]`: Megatron-LM's SCRIPT (pretrain_gpt.py)
as it is, with one change: megatron-core's dataset helpers come from the wheel (it ships them
compiled and no Makefile; compact_dist.megatron.megatron_lm does the same). The baseline runs
of megatron_lm_client.py: no compact_dist spec, merge or norm."""

import os
import runpy
import sys

from compact_dist.megatron.megatron_lm import use_packaged_dataset_helpers

if __name__ == "__main__":
    script = os.path.abspath(sys.argv[1])
    sys.path.insert(0, os.path.dirname(script))
    use_packaged_dataset_helpers()
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
