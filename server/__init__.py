"""smolora.server"""
