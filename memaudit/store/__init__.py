"""memaudit.store"""
