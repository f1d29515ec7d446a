"""`megaportrait eval`: how well portraits keep the person (by stage, by skin tone, under bad photos) and how much
an Identity Net adapter gives away about its training photos.

One module per question: `dataset` (folders -> checked faces), `identity`, `fairness`, `robustness`, `privacy`;
`run` ties them together and writes JSON, plots (`plots`) and an HTML summary (`summary`). Nothing runs at import.
"""
