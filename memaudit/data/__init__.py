"""memaudit.data"""
