"""Release stages: WORK cases -> a versioned release folder -> a mirror or the Hub.

splits -> shards -> card -> build (``build_release``) -> publish.
"""
