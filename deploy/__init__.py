"""Launchers and deployment: the pdserve CLI, the local cluster, Dockerfiles and manifests."""
