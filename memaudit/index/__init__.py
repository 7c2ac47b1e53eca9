"""memaudit.index"""
