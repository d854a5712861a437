"""fedattn"""
