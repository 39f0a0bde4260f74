"""Importers: public corpora and photo libraries → the manifest contract (SPEC §1).

One module per source (`mirflickr`, `nuswide`, `yfcc100m`, `folder`), each streaming into
`common.ManifestWriter` and returning a `common.ImportSummary` of what it wrote and skipped.
"""
