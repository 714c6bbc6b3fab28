"""Architecture knowledge: per-family adapters and lmpress's own heterogeneous GPT-OSS classes.

Importing this package registers `gpt_oss_puzzle` with the Auto classes, so lmpress loads
heterogeneous checkpoints without running code shipped inside them.
"""

from lmpress.models.gpt_oss_puzzle import register

register()
