"""pcsc_bridge.client"""
