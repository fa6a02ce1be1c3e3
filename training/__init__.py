"""smolora.training"""
