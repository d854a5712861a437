"""SpecFed: federated ensemble decoding with speculative drafts and top-K compressed distributions (../shared/spec/specfed.md)."""  # noqa: E501
