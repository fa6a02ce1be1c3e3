"""smolora.clients"""
