"""pcsc_bridge.server"""
