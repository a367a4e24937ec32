"""The prototype family: methods that keep class statistics of a (mostly) frozen backbone and
classify by them: SimpleCIL, APER, RanPAC, EASE, MOS, TUNA. ``base`` holds the family's strategy
base and cosine head, ``first_session`` the first-task adapter tuning APER and RanPAC share,
``parallel_adapter`` and ``ssf`` the two tuners, ``task_adapters`` the per-task adapter sets MOS
and TUNA share.

Recipes, sources and deviations: docs/methods/prototype.md
"""
