"""memaudit.criteria"""
