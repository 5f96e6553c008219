"""Model-based rewards (HPSv2.1, HPSv3, VideoReward VQ/MQ/TA), registered lazily: importing this
package imports no torch model code; a module loads when its reward is built.

Every reward loads offline from local directories named in its options (``checkpoint_dir``,
``backbone_dir``); see each module's docstring for the exact files and where to get them.
"""

from __future__ import annotations

from astrolabe.rewards.registry import register_reward

register_reward("hpsv2", "astrolabe.rewards.models.hpsv2:build")
register_reward("hpsv3", "astrolabe.rewards.models.hpsv3:build")
register_reward("videoalign_vq", "astrolabe.rewards.models.videoalign:build_vq")
register_reward("videoalign_mq", "astrolabe.rewards.models.videoalign:build_mq")
register_reward("videoalign_ta", "astrolabe.rewards.models.videoalign:build_ta")

__all__: list[str] = []
