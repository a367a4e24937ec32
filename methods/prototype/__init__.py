"""The prototype family: methods that keep class statistics of a (mostly) frozen backbone and
classify by them: SimpleCIL, APER, RanPAC, EASE. ``base`` holds the family's strategy base and
cosine head, ``first_session`` the first-task adapter tuning APER and RanPAC share,
``parallel_adapter`` and ``ssf`` the two tuners.

Recipes, sources and deviations: docs/methods/prototype.md
"""
