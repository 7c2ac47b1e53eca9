"""memaudit.canary"""
