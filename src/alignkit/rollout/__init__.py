"""Sampling the policy and scoring its responses: the one layer every stage that learns from its own samples
uses. `sampling` draws responses (seeded chunks, any process count samples alike), `rewards` scores them
(gold task reward or a reward model), `ppo` holds the PPO-specific rollout helpers. Import from the
submodules: `from alignkit.rollout.sampling import sample_generations`.
"""
