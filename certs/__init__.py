"""pcsc_bridge.certs"""
