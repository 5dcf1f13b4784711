"""The NIRVANA method and the baselines it is compared with: unit scores (`saliency`, `criteria`), how many
units each layer keeps (`allocation`, `plan`), the choice of calibration set and gamma by held-out KL (`kl`,
`selection`, `calibration`), and removing units (`surgery`). A new criterion is one entry in `criteria.py`.

May import: nirvana.core, nirvana.models.
"""
